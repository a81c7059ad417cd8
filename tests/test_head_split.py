"""Serving with a head map: the split as served (the same count per layer), the
streaming heads' block manager (sinks + recent window, the rest back to the
pool), the split layer's attention against a float reference of
DuoAttention's mixed attention, the capacity vLLM reports, the engine end to
end, and the GPU start-up refusal."""
import functools
import json
import random

import pytest
import torch

import vllm_kvcomp
from e2e_util import engine_config
from sim_paged import SimPagedCache, manager_on_pool
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.attention_ref import kvcomp_step_reference
from vllm_kvcomp.kernels.head_split_ref import split_step_reference
from vllm_kvcomp.policies.attention import window_mask
from vllm_kvcomp.policies.head_map import HeadMap, HeadMapError, served_split
from vllm_kvcomp.policies.quest import Quest

vllm_kvcomp.register()


def _write(tmp_path, content, name="map.json"):
    p = tmp_path / name
    p.write_text(json.dumps(content))
    return str(p)


# ------------------------------------------------------------ served split


def test_gates_are_thresholded_per_layer():
    hm = HeadMap(gates=((0.9, 0.1, 0.5, 0.3), (0.2, 0.2, 0.8, 0.7), (0.6, 0.7, 0.8, 0.9)))
    split = served_split(hm, 0.5)
    assert split.streaming == ((1, 3), (0, 1), (0, 1))
    assert split.retrieval == ((0, 2), (2, 3), (2, 3))
    # round half up per layer: 0.375 * 4 = 1.5 -> 2; ties go to the earlier head
    assert served_split(hm, 0.375).streaming == ((1, 3), (0, 1), (0, 1))
    assert served_split(hm, 0.25).streaming == ((1,), (0,), (0,))
    assert served_split(hm, 0.0).num_streaming == 0


def test_roles_are_served_as_written_with_equal_counts():
    hm = HeadMap(roles=(("retrieval", "streaming"), ("streaming", "retrieval")))
    split = served_split(hm, 0.9)  # the ratio does not apply to roles
    assert split.retrieval == ((0,), (1,)) and split.streaming == ((1,), (0,))


@pytest.mark.parametrize("hm, message", [
    (HeadMap(roles=(("retrieval", "streaming"), ("streaming", "streaming")), source="m.json"),
     r"head map m.json has different numbers of streaming heads per layer \(\[1, 2\]\)"),
    (HeadMap(roles=(("streaming", "streaming"),) * 2, source="m.json"),
     "every KV head of every layer streams"),
    (HeadMap(gates=((0.1, 0.2),), source="g.tsv"), "every KV head of every layer streams"),
])
def test_maps_that_cannot_be_served_are_named(hm, message):
    with pytest.raises(HeadMapError, match=message):
        served_split(hm, 1.0)


# ------------------------------------------------------------ block manager


def _stream_manager(sink, recent, bs, num_blocks, concurrent=1, heads=1):
    from vllm_kvcomp.spec import KvcompStreamManager, KvcompStreamSpec

    spec = KvcompStreamSpec(block_size=bs, num_kv_heads=heads, head_size=64, dtype=torch.float32,
                            sink_tokens=sink, recent_tokens=recent,
                            concurrent_steps=concurrent)
    pool, mgr = manager_on_pool(spec, num_blocks)
    assert isinstance(mgr, KvcompStreamManager)
    return spec, pool, mgr


def _needed_pages(spec, n):
    """Pages a query at position n (and any later one) may read: the sinks
    and the recent window [n + 1 - R, n)."""
    bs, S, R = spec.block_size, spec.sink_tokens, spec.recent_tokens
    return {j // bs for j in range(n) if j < S or j >= n + 1 - R}


@pytest.mark.parametrize("sink, recent, bs, lag", [
    (4, 40, 8, 0), (64, 256, 32, 0), (1, 8, 16, 0), (20, 24, 4, 1), (5, 70, 16, 1)])
def test_stream_manager_holds_only_sinks_and_windows(sink, recent, bs, lag):
    """Chunks then decodes; with ``lag`` 1 each step is scheduled before the
    previous one is processed (async scheduling). The pages every later
    query reads are held, the held count stays within the admission cap
    that start-up counted, and everything else is in the pool."""
    spec, pool, mgr = _stream_manager(sink, recent, bs, 400, concurrent=1 + lag)
    free0 = pool.get_num_free_blocks()
    cap = spec.max_admission_blocks_per_request(0, 1 << 16)
    rng = random.Random(sink)
    steps = [rng.choice([1, 7, 50, 130, 300]) for _ in range(12)] + [1] * 100
    ends = []
    c = 0
    for step in steps:
        processed = ends[-1 - lag] if len(ends) > lag else 0
        mgr.remove_skipped_blocks("r", processed)
        n = c + step
        need = mgr.get_num_blocks_to_allocate("r", n, [], c, c, n)
        before = pool.get_num_free_blocks()
        new = mgr.allocate_new_blocks("r", n, n)
        assert len(new) == len(mgr.req_to_blocks["r"]) - (-(-c // bs))
        assert need == before - pool.get_num_free_blocks()
        blocks = mgr.req_to_blocks["r"]
        assert len(blocks) == -(-n // bs)
        held = {i for i, b in enumerate(blocks) if not b.is_null}
        # every step still to run reads its window from these pages
        for start in [processed, *ends[len(ends) - lag:], n]:
            assert _needed_pages(spec, start) <= held, (start, sorted(held))
        assert len(held) <= cap
        assert pool.get_num_free_blocks() == free0 - len(held)
        ends.append(n)
        c = n
    assert len(held) < len(blocks) // 2  # pages really went back
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


def _held_pages(spec, n):
    """The pages the manager keeps once ``n`` tokens are processed."""
    sinks, lo, hi = spec.live_pages(n)
    return set(range(min(sinks, hi))) | set(range(max(lo, sinks), hi))


def _expected_hit(spec, cached, max_length, alignment):
    bs = spec.block_size
    for n in range(max_length // bs, 0, -1):
        h = n * bs
        if h % alignment == 0 and _held_pages(spec, h) <= cached:
            return h
    return 0


@pytest.mark.parametrize("sink, recent, bs", [(4, 40, 8), (64, 256, 32), (1, 8, 16),
                                               (20, 24, 4), (3, 100, 32)])
def test_stream_hit_is_the_longest_prefix_whose_sinks_and_window_are_cached(sink, recent,
                                                                           bs):
    """A hit of ``h`` tokens needs the pages the manager would hold at ``h``
    (which hold every position a query from ``h`` on reads: the sinks and
    the window before ``h``) cached, and nothing else: the longest such
    prefix over random sets of cached pages, the others null."""
    from test_residual_manager import _Pool

    from vllm_kvcomp.spec import KvcompStreamManager, KvcompStreamSpec

    spec = KvcompStreamSpec(block_size=bs, num_kv_heads=1, head_size=64, dtype=torch.float32,
                            sink_tokens=sink, recent_tokens=recent)
    rng = random.Random(sink + recent + bs)
    hits = 0
    for _ in range(300):
        n = rng.randrange(1, 60)
        cached = {i for i in range(n) if rng.random() < 0.85}
        max_length = rng.randrange(0, n * bs + 1)
        alignment = bs * rng.choice([1, 2])
        blocks, h = KvcompStreamManager.find_longest_cache_hit(
            list(range(n)), max_length, [1, 2], _Pool(cached, bs), spec, False, alignment)
        assert h == _expected_hit(spec, cached, max_length, alignment)
        hits += h > 0
        assert all(len(b) == h // bs for b in blocks)
        live = _held_pages(spec, h)
        assert _needed_pages(spec, h) <= live
        start = rng.randrange(0, n + 1)
        assert spec.held_pages(h, start) == sorted(i for i in live if i >= start)
        for i, blk in enumerate(blocks[0]):
            assert blk.is_null == (i not in live)
    assert hits > 30


def test_a_finished_requests_pages_give_the_next_one_a_hit():
    """A request's chunks and decodes hash its full live pages; once it ends,
    another with the same tokens hits at the longest prefix whose sinks and
    window are still in the pool (its last full page), takes exactly the
    pages its allocation count said, and a request with other tokens hits
    nothing."""
    from types import SimpleNamespace

    spec, pool, mgr = _stream_manager(16, 64, 16, 200)
    bs = spec.block_size
    free0 = pool.get_num_free_blocks()
    hashes = [f"h{i}".encode() for i in range(40)]
    req = SimpleNamespace(request_id="a", num_prompt_tokens=400, shared_prefix_boundary=None,
                          block_hashes=hashes)
    c = 0
    for n in (150, 300, 400, *range(401, 421)):
        mgr.remove_skipped_blocks("a", c)
        mgr.get_num_blocks_to_allocate("a", n, [], c, c, n)
        mgr.allocate_new_blocks("a", n, n)
        mgr.cache_blocks(req, n)
        c = n
    mgr.free("a")
    assert pool.get_num_free_blocks() == free0
    blocks, h = type(mgr).find_longest_cache_hit(hashes, 39 * bs, [0], pool, spec, False, bs)
    assert h == 420 // bs * bs
    assert _needed_pages(spec, h) <= {i for i, b in enumerate(blocks[0]) if not b.is_null}
    # the next request hits and continues: the count is what the pool gives
    need = mgr.get_num_blocks_to_allocate("b", h + 50, blocks[0], h, h, h + 50)
    before = pool.get_num_free_blocks()
    mgr.add_local_computed_blocks("b", blocks[0], h, 0)
    mgr.allocate_new_blocks("b", h + 50, h + 50)
    assert need == before - pool.get_num_free_blocks()
    held = {i for i, b in enumerate(mgr.req_to_blocks["b"]) if not b.is_null}
    assert _needed_pages(spec, h + 50) <= held
    mgr.free("b")
    assert pool.get_num_free_blocks() == free0
    other = [f"x{i}".encode() for i in range(40)]
    assert type(mgr).find_longest_cache_hit(other, 39 * bs, [0], pool, spec, False, bs)[1] == 0


def test_stream_spec_has_its_own_group():
    from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

    from vllm_kvcomp.residual_layer import packed_spec
    from vllm_kvcomp.stream_layer import stream_spec

    cfg = KvcompConfig(sink_tokens=64, recent_tokens=256)
    packed = packed_spec(cfg, 128, 1, 128, torch.bfloat16)
    st = stream_spec(cfg, packed, 1)
    assert st.page_size_bytes == packed.page_size_bytes
    assert st.real_page_size_bytes <= packed.page_size_bytes
    assert (st.block_size, st.num_kv_heads) == (32, 1)
    full = FullAttentionSpec(block_size=32, num_kv_heads=1, head_size=128, dtype=torch.bfloat16)
    swa = SlidingWindowSpec(block_size=32, num_kv_heads=1, head_size=128, dtype=torch.bfloat16,
                            sliding_window=256)
    for other in (full, swa, packed):
        assert not other.is_uniform_with_collection({"a": other, "b": st})
        assert not st.is_uniform_with_collection({"a": other, "b": st})


# ---------------------------------------------------------------- attention

D = 64


class _StreamPages:
    """Streaming heads' pages driven by the real block manager; the null
    block and every page given back hold NaN, so reading one shows."""

    def __init__(self, sink, recent, heads, bs):
        self.spec, self.pool, self.mgr = _stream_manager(sink, recent, bs, 600, heads=heads)
        self.bs = bs
        self.cache = torch.full((600, 2, heads, bs, D), float("nan"))

    def step(self, c, n):
        before = {b.block_id for b in self.mgr.req_to_blocks.get("r", []) if not b.is_null}
        self.mgr.remove_skipped_blocks("r", c)
        after = {b.block_id for b in self.mgr.req_to_blocks.get("r", []) if not b.is_null}
        for b in before - after:
            self.cache[b] = float("nan")
        self.mgr.allocate_new_blocks("r", n, n)
        self.cache[0] = float("nan")
        row = torch.tensor([b.block_id for b in self.mgr.req_to_blocks["r"]], dtype=torch.int32)
        slots = torch.tensor([int(row[p // self.bs]) * self.bs + p % self.bs
                              for p in range(c, n)])
        return row[None], slots


def _duo_reference(q, k, v, streaming, sink, recent):
    """DuoAttention's mixed attention in float64, written from its definition:
    per KV head a causal mask, narrowed to sinks + recent window where the
    head streams; the query heads of a KV head share its mask."""
    T, Hq, _ = q.shape
    H = k.shape[1]
    rep = Hq // H
    full, stream = window_mask(T, T), window_mask(T, T, sink, recent)
    out = torch.empty(T, Hq, D, dtype=torch.float64)
    for h in range(H):
        mask = stream if h in streaming else full
        for r in range(rep):
            s = (q[:, h * rep + r].double() @ k[:, h].double().T) * D ** -0.5
            p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1)
            out[:, h * rep + r] = p @ v[:, h].double()
    return out


def _run_split(cfg, split, chunks, q, k, v, bs, quest=None):
    retrieval, streaming = split
    T = q.shape[0]
    rep = q.shape[1] // k.shape[1]
    sim = SimPagedCache(cfg, bs, len(retrieval), D, 1, T, seed=3)
    bs_s = max(1, bs // 4)
    pages = _StreamPages(cfg.sink_tokens, cfg.recent_tokens, len(streaming), bs_s)
    out = torch.zeros_like(q)
    c = 0
    for step in chunks:
        n = c + step
        row, slots = pages.step(c, n)
        o = torch.zeros(step, q.shape[1], D)
        split_step_reference(q[c:n], k[c:n], v[c:n], o, sim.packed, sim.residual, sim.layout,
                             cfg, D ** -0.5, sim.batch([c], [n]), split, pages.cache, row,
                             slots, bs_s, quest=quest)
        out[c:n] = o
        c = n
    assert len(out) == T and rep >= 1
    return out


# (kv heads, query heads per kv head, streaming heads, block size, steps)
SHAPES = [
    (2, 1, [1], 16, [37, 1, 1, 60, 1, 1, 1]),
    (4, 4, [0, 2], 16, [100, 3, 1, 1, 45] + [1] * 6),
    (8, 1, [1, 2, 5, 6], 32, [70, 70, 1, 1, 1]),
    (2, 8, [0], 16, [13, 29, 1, 1, 41, 1]),
    (4, 8, [3], 8, [150] + [1] * 5),
    (3, 4, [0, 1], 16, [1] * 20 + [77]),
]


@pytest.mark.parametrize("H, rep, streaming, bs, chunks", SHAPES)
@pytest.mark.parametrize("sink, recent", [(4, 24), (1, 7), (16, 40)])
def test_split_layer_equals_duo_attention_in_float(H, rep, streaming, bs, chunks, sink, recent):
    """16-bit retrieval heads (nothing quantized): the layer's output is
    DuoAttention's mixed attention itself. Tolerance: float32 attention over
    at most a few hundred keys against float64 (observed < 1e-6)."""
    cfg = KvcompConfig(k_bits=16, v_bits=16, residual_tokens=8, sink_tokens=sink,
                       recent_tokens=recent)
    split = ([h for h in range(H) if h not in streaming], streaming)
    T = sum(chunks)
    g = torch.Generator().manual_seed(H * 100 + rep + sink)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * rep, H, H))
    out = _run_split(cfg, split, chunks, q, k, v, bs)
    assert torch.isfinite(out).all()
    ref = _duo_reference(q, k, v, set(streaming), sink, recent)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=1e-4)
    # the window did cut something off: a streaming head is not full attention
    full = _duo_reference(q, k, v, set(), sink, recent)
    assert (ref - full).abs().max() > 1e-3


@pytest.mark.parametrize("kvcomp", [
    {"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32},
    {"k_bits": 2, "v_bits": 4, "key_axis": "token", "group_size": 32, "residual_tokens": 0},
    # Quest on the retrieval heads: 2 of their 6-7 packed pages a decode step
    {"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 0, "quest": 64},
])
def test_quantized_retrieval_heads_are_the_unsplit_layer_on_those_heads(kvcomp):
    """With packed retrieval heads, the split layer's retrieval heads equal
    the ordinary compressed layer run on those heads alone (exactly), Quest's
    page selection included, and its streaming heads DuoAttention's float
    streaming attention."""
    kvcomp = dict(kvcomp)
    H, rep, bs = 4, 2, 32
    budget = kvcomp.pop("quest", None)
    quest = Quest(budget, bs) if budget else None
    cfg = KvcompConfig.from_dict({**kvcomp, "sink_tokens": 8, "recent_tokens": 40})
    split = ([0, 3], [1, 2])
    chunks = [90, 41, 1, 1, 64] + [1] * 8
    T = sum(chunks)
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * rep, H, H))
    out = _run_split(cfg, split, chunks, q, k, v, bs, quest).view(T, H, rep, D)
    r = torch.tensor(split[0])
    qr = q.view(T, H, rep, D)[:, r].reshape(T, -1, D)
    # the unsplit layer with the same selection, and without one
    runs = [(SimPagedCache(cfg, bs, 2, D, 1, T, seed=3), torch.zeros(T, 2 * rep, D), sel)
            for sel in (quest, None)]
    c = 0
    for step in chunks:
        n = c + step
        for sim, res, sel in runs:
            o = torch.zeros(step, 2 * rep, D)
            kvcomp_step_reference(qr[c:n], k[c:n, r], v[c:n, r], o, sim.packed, sim.residual,
                                  sim.layout, cfg, D ** -0.5, sim.batch([c], [n]), quest=sel)
            res[c:n] = o
        c = n
    plain, dense = runs[0][1], runs[1][1]
    assert torch.equal(out[:, r].reshape(T, -1, D), plain)
    if quest is not None:  # the selection did leave pages out of the late decode steps
        assert (plain[-8:] - dense[-8:]).abs().max() > 1e-3
    ref = _duo_reference(q, k, v, set(split[1]), 8, 40).view(T, H, rep, D)
    torch.testing.assert_close(out[:, split[1]].double(), ref[:, split[1]], atol=2e-5,
                               rtol=1e-4)


# ---------------------------------------------------------------- capacity

NUM_LAYERS, KV_HEADS, HEAD = 4, 2, 128


def _capacity(model, cfg, max_model_len, split_heads):
    """Tokens vLLM reports (get_kv_cache_capacity, the "GPU KV cache size"
    line) for 1 GiB, with the specs the attention layers declare."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    from vllm_kvcomp.residual_layer import packed_spec, residual_spec
    from vllm_kvcomp.stream_layer import stream_spec

    vc = EngineArgs(model=model, max_model_len=max_model_len, block_size=128,
                    max_num_batched_tokens=8192).create_engine_config()
    retrieval = KV_HEADS - split_heads
    packed = packed_spec(cfg, 128, retrieval, HEAD, torch.bfloat16)
    specs = {}
    for i in range(NUM_LAYERS):
        specs[f"layer.{i}"] = packed
        if cfg.needs_residual_cache:
            specs[f"layer.{i}.kvcomp_residual"] = residual_spec(packed,
                                                                vc.max_concurrent_batches)
        if split_heads:
            specs[f"layer.{i}.kvcomp_stream"] = stream_spec(cfg, packed, split_heads,
                                                            vc.max_concurrent_batches)
    config = get_kv_cache_configs(vc, [specs], [1 << 30])[0]
    return get_kv_cache_capacity(vc, config)[0]


@pytest.mark.parametrize("bits, floor", [(16, 1.8), (8, 1.8), (4, 1.8), (2, 1.6)])
def test_half_streaming_heads_nearly_double_the_capacity(tmp_path, bits, floor):
    """max_model_len 32768, half the KV heads streaming (64 + 256 tokens):
    the streaming heads cost a few hundred tokens a request, so the reported
    capacity nearly doubles (at 2 bits the retrieval heads' pages are small
    beside the streaming heads' unquantized window)."""
    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    cfg = KvcompConfig(k_bits=bits, v_bits=bits)
    plain = _capacity(model, cfg, 32768, 0)
    split = _capacity(model, cfg, 32768, 1)
    print(bits, plain, split, split / plain)
    assert split / plain >= floor
    assert split / plain < 2.0  # the streaming heads are not free


# ---------------------------------------------------------------- start-up


def test_startup_accepts_a_map_on_cpu_and_names_one_it_cannot_serve(tmp_path):
    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    engine_config(model, {"head_map": _write(tmp_path, {"gates": [[0.9, 0.1]] * 4})})
    bad = _write(tmp_path, {"layers": [["retrieval", "streaming"]] * 3 +
                            [["retrieval", "retrieval"]]}, "uneven.json")
    with pytest.raises(ValueError, match=rf"kvcomp head_map: head map {bad} has different "
                                         r"numbers of streaming heads per layer"):
        engine_config(model, {"head_map": bad})


def test_head_map_without_the_hybrid_kv_cache_manager_is_named(tmp_path):
    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    path = _write(tmp_path, {"gates": [[0.9, 0.1]] * 4})
    with pytest.raises(ValueError, match="head_map .* needs vLLM's hybrid KV cache manager"):
        engine_config(model, {"head_map": path, "k_bits": 16, "v_bits": 16,
                              "residual_tokens": 0}, disable_hybrid_kv_cache_manager=True)


def test_gpu_platform_serves_a_head_map(tmp_path, monkeypatch):
    """The split's Triton path has served on a GPU: a GPU start-up takes a
    valid map with no further switch, and still refuses a map for another
    model."""
    from vllm.platforms import current_platform

    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    path = _write(tmp_path, {"gates": [[0.9, 0.1]] * 4})
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)
    config = engine_config(model, {"head_map": path})
    assert config.additional_config["kvcomp"]["head_map"] == path
    other = _write(tmp_path, {"gates": [[0.9, 0.1]] * 3}, "three_layers.json")
    with pytest.raises(ValueError, match="head_map"):
        engine_config(model, {"head_map": other})


# --------------------------------------------------------------- end to end

HALF = {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]] * 2}
ALL_RETRIEVAL = {"layers": [["retrieval", "retrieval"]] * 4}


def test_engine_with_a_head_map_end_to_end(tiny_llama, tmp_path):
    """An all-retrieval map is no split (16 bits and k4v4); with sinks +
    recent window covering every sequence, streaming heads equal full heads
    (16 bits: nothing else differs). A small window serves chunked prompts
    with prefix caching on, on a pool tight enough to preempt, gives the
    tokens each prompt gets served alone, and gives every page back."""
    from e2e_util import POLICY_BASE, POLICY_K16, policy_spec, run_engines

    half = _write(tmp_path, HALF)
    all_r = _write(tmp_path, ALL_RETRIEVAL, "all.json")
    spec = functools.partial(policy_spec, tiny_llama)
    k16, k16_all, wide, k4, k4_all, small = run_engines(
        dict(spec=spec(POLICY_K16), shared=True),
        dict(spec=spec({**POLICY_K16, "head_map": all_r})),
        dict(spec=spec({**POLICY_K16, "head_map": half, "sink_tokens": 1, "recent_tokens": 2048})),
        dict(spec=spec(POLICY_BASE), shared=True),
        dict(spec=spec({**POLICY_BASE, "head_map": all_r})),
        # together, then each alone: a request within max_model_len is never
        # preempted when it runs alone (prefix hits, where the tight pool kept
        # the pages, give the same tokens: test_prefix_consistency.py)
        dict(spec=spec({**POLICY_BASE, "head_map": half, "sink_tokens": 16, "recent_tokens": 64},
                       batches=[[0, 1, 2, 3], [0], [1], [2], [3]], num_gpu_blocks_override=140)))
    assert k16_all["tokens"] == k16["tokens"]
    assert wide["tokens"] == k16["tokens"]
    assert k4_all["tokens"] == k4["tokens"]
    assert [len(t) for t in small["tokens"]] == [24] * 8
    assert small["preemptions"] >= 1
    assert small["tokens"][:4] == small["tokens"][4:]
    assert small["kv_cache_usage"] == 0
    assert small["tokens"][:4] != k4["tokens"]  # the window changed long requests


def test_engine_reports_the_split_capacity(tiny_llama, tmp_path):
    """The capacity vLLM logs at max_model_len 32768 (k4v4, bf16, 1 GiB):
    half the heads streaming (64 + 256 tokens) nearly doubles it."""
    from e2e_util import policy_spec, run_engines

    half = _write(tmp_path, {"gates": [[0.9, 0.1]] * 4})
    # the capacity is logged at start-up: one short request shows the engine serves
    runs = run_engines(*(dict(spec=policy_spec(tiny_llama, kv, lengths=(40,), max_tokens=1,
                                               max_model_len=32768, dtype="bfloat16"))
                         for kv in ({"k_bits": 4, "v_bits": 4},
                                    {"k_bits": 4, "v_bits": 4, "head_map": half})))
    plain, split = (r["kv_cache_tokens"] for r in runs)
    print(plain, split, split / plain)
    assert split >= 1.8 * plain


def test_head_map_with_quest_is_accepted(tmp_path):
    """Quest selects pages for the retrieval heads; the streaming heads read
    only their sinks and window, so there is nothing to select."""
    from vllm_kvcomp.validation import check_head_map

    cfg = KvcompConfig.from_dict({"head_map": _write(tmp_path, {"gates": [[0.9, 0.1]] * 4}),
                                  "quest": {"budget_tokens": 512}})
    check_head_map(cfg, None)
    assert cfg.quest is not None and cfg.head_map is not None
