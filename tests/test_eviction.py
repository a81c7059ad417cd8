"""StreamingLLM eviction: the kept ranges, the block manager that gives the
dropped pages back to vLLM's pool, the CPU attention over exactly the kept
positions, the engine end to end, and the start-up refusals."""
import math
import os
import random

import pytest
import torch

import vllm_kvcomp
from sim_paged import SimPagedCache, manager_on_pool
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.policies.streaming import StreamingLLM

vllm_kvcomp.register()


def _ev(sink, recent):
    return {"method": "streamingllm", "sink_tokens": sink, "recent_tokens": recent}


# --------------------------------------------------------------- kept ranges


def _dropped_brute(n, q, S, R, bs):
    """Pages whose every position is neither a sink (< S), nor recent
    (>= n - R), nor at or past the packed boundary q: the largest set of whole
    pages that can go, computed position by position with float bounds."""
    out = set()
    for page in range(int(math.ceil(max(q, 1) / float(bs))) + 1):
        if all(float(S) <= j < float(n) - float(R) and j < float(q)
               for j in range(page * bs, (page + 1) * bs)):
            out.add(page)
    return out


def test_kept_ranges_match_brute_force():
    rng = random.Random(0)
    cases = [(n, q, S, R, bs) for bs in (1, 4, 16) for S in (1, 4, 16, 17) for R in (1, 5, 32)
             for n in range(0, 90, 7) for q in {0, n // 2, max(0, n - 9), n}]
    cases += [(n, rng.randrange(0, n + 1), rng.randrange(1, 70), rng.randrange(1, 200),
               rng.choice([8, 16, 32, 128]))
              for n in (rng.randrange(0, 3000) for _ in range(400))]
    for n, q, S, R, bs in cases:
        p = StreamingLLM(S, R, bs)
        lo, hi = p.dropped_pages(n, q)
        assert set(range(lo, hi)) == _dropped_brute(n, q, S, R, bs), (n, q, S, R, bs)
        kept = {j for a, b in p.kept_ranges(n, q) for j in range(a, b)}
        dropped = {j for page in range(lo, hi) for j in range(page * bs, (page + 1) * bs)}
        assert kept == set(range(q)) - dropped
        # no kept token is dropped
        assert all(j in kept for j in range(min(S, q)))
        assert all(j in kept for j in range(max(0, n - R), q))
        # what is dropped now stays dropped later (the manager frees for good)
        lo2, hi2 = p.dropped_pages(n + rng.randrange(0, 50), q + rng.randrange(0, 50))
        assert lo2 <= lo or hi <= lo
        assert hi2 >= hi


def test_kept_ranges_example():
    p = StreamingLLM(4, 10, 8)
    # sinks rounded up to page 0 ([0, 8)), recent [90, 100) down to 88
    assert p.kept_ranges(100, 100) == [(0, 8), (88, 100)]
    # the page that the packed boundary falls in is never dropped
    assert p.kept_ranges(100, 60) == [(0, 8), (56, 60)]
    assert p.kept_ranges(15, 15) == [(0, 15)]


# ------------------------------------------------------------------ manager


def _manager(cfg, bs, num_blocks, in_flight):
    from vllm_kvcomp.residual_layer import packed_spec
    from vllm_kvcomp.spec import KvcompEvictionManager, KvcompEvictionSpec

    spec = packed_spec(cfg, bs, 2, 64, torch.float32, in_flight)
    assert isinstance(spec, KvcompEvictionSpec)
    pool, mgr = manager_on_pool(spec, num_blocks, max_in_flight_tokens=in_flight)
    assert isinstance(mgr, KvcompEvictionManager)
    return spec, pool, mgr


@pytest.mark.parametrize("kvcomp,bs", [
    ({"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32,
      "eviction": _ev(4, 40)}, 32),
    ({"k_bits": 2, "v_bits": 2, "key_axis": "token", "residual_tokens": 0,
      "eviction": _ev(20, 24)}, 16),
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 100,
      "eviction": _ev(1, 8)}, 16),
])
def test_manager_frees_dropped_pages_into_the_pool(kvcomp, bs):
    cfg = KvcompConfig.from_dict(kvcomp)
    chunk = 50
    spec, pool, mgr = _manager(cfg, bs, 200, chunk)
    policy = spec.policy
    free0 = pool.get_num_free_blocks()
    cap = spec.max_admission_blocks_per_request(chunk, 1 << 16)
    steps = [chunk] * 6 + [1] * 150  # prefill chunks, then decode steps
    c = 0
    seen_free = False
    for step in steps:
        n = c + step
        mgr.remove_skipped_blocks("r", c, 300)
        blocks = mgr.req_to_blocks["r"]
        lo, hi = policy.dropped_pages(c, spec.packed_tokens(c))
        # freed exactly the pages dropped for the processed tokens, in place
        assert [i for i, b in enumerate(blocks) if b.is_null] == \
            [i for i in range(lo, min(hi, len(blocks)))]
        need = mgr.get_num_blocks_to_allocate("r", n, [], c, c, n)
        before = pool.get_num_free_blocks()
        new = mgr.allocate_new_blocks("r", n, n)
        assert len(new) == need == before - pool.get_num_free_blocks()
        blocks = mgr.req_to_blocks["r"]
        # rows stay position-indexed: one entry per packed page of [0, Q(n))
        assert len(blocks) == -(-spec.packed_tokens(n) // bs)
        held = [b for b in blocks if not b.is_null]
        assert len(held) <= cap
        # the pool holds every page the request does not
        assert pool.get_num_free_blocks() == free0 - len(held)
        seen_free |= hi > lo and hi <= len(blocks)
        c = n
    assert seen_free
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


def test_manager_never_reports_a_prefix_hit():
    cfg = KvcompConfig.from_dict({"eviction": _ev(4, 64)})
    spec, pool, mgr = _manager(cfg, 128, 20, 256)
    blocks, h = type(mgr).find_longest_cache_hit(list(range(8)), 1024, [0], pool, spec,
                                                  False, 128)
    assert h == 0 and blocks == ([],)


def test_capacity_counts_only_kept_pages():
    from vllm_kvcomp.residual_layer import packed_spec

    class _VC:
        max_in_flight_tokens = 512

        class model_config:
            max_model_len = 32768

    # the eviction's layout: 128-token groups (k4v4's default layout is for plain settings)
    full = packed_spec(KvcompConfig(group_size=128), 128, 8, 128, torch.bfloat16)
    ev = packed_spec(KvcompConfig.from_dict({"eviction": _ev(4, 1024)}), 128, 8, 128,
                     torch.bfloat16, 512)
    assert ev.page_size_bytes == full.page_size_bytes
    pages = ev.max_memory_usage_bytes(_VC) // ev.page_size_bytes
    # sinks (1 page) + cdiv(1024 + 512 + 127, 128)
    assert pages == 1 + 13
    # no full-precision window by default at 4 bits: all 32768 tokens packed
    assert full.max_memory_usage_bytes(_VC) // full.page_size_bytes == 256


def test_eviction_spec_does_not_group_with_full_attention():
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from vllm_kvcomp.residual_layer import packed_spec

    ev = packed_spec(KvcompConfig.from_dict({"eviction": _ev(4, 64)}), 16, 2, 64,
                     torch.float32)
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=64, dtype=torch.float32)
    assert not isinstance(ev, FullAttentionSpec)
    assert not full.is_uniform_with_collection({"a": full, "b": ev})
    assert not ev.is_uniform_with_collection({"a": full, "b": ev})


# ---------------------------------------------------------------- attention

H, REP, D = 2, 2, 64


def _run(cfg, chunks, q, k, v, bs, poison_dropped):
    """One request through the reference steps; with ``poison_dropped`` the
    pages the manager would have freed (dropped for the processed tokens)
    point at a page of 0xFF bytes (NaN scales), as a stale id might."""
    T = q.shape[0]
    sim = SimPagedCache(cfg, bs, H, D, 1, T, seed=1)
    sim.packed[0].fill_(0xFF)
    out = torch.zeros_like(q)
    c = 0
    for step in chunks:
        if poison_dropped:
            lo, hi = cfg.eviction.policy(bs).dropped_pages(c, cfg.quantized_prefix_len(c))
            sim.block_table[0, lo:max(lo, hi)] = 0
        n = c + step
        out[c:n] = sim.reference_step(q, k, v, c, n)
        c = n
    return out, sim


def _kept_float_attention(cfg, q, k, v, k_deq, v_deq, bs):
    """Float attention of every query over exactly its kept positions:
    packed (dequantized) keys below its bound Q(p) that the policy keeps,
    and full-precision keys from Q(p) to p."""
    policy = cfg.eviction.policy(bs)
    out = torch.zeros_like(q)
    for p in range(q.shape[0]):
        b = cfg.quantized_prefix_len(p)
        idx = [j for a, e in policy.kept_ranges(p + 1, b) for j in range(a, e)]
        kk = torch.cat([k_deq[idx], k[b:p + 1]]).float()
        vv = torch.cat([v_deq[idx], v[b:p + 1]]).float()
        qq = q[p].view(H, REP, D).float()
        s = torch.einsum("hrd,khd->hrk", qq, kk) * D ** -0.5
        out[p] = torch.einsum("hrk,khd->hrd", torch.softmax(s, -1), vv).reshape(H * REP, D)
    return out


@pytest.mark.parametrize("kvcomp,bs,chunks", [
    ({"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32,
      "eviction": _ev(4, 40)}, 32, [100, 37, 64] + [1] * 40),
    ({"k_bits": 2, "v_bits": 4, "key_axis": "token", "residual_tokens": 8,
      "eviction": _ev(20, 24)}, 16, [33, 70, 1, 1, 50] + [1] * 30),
    ({"k_bits": 4, "v_bits": 2, "group_size": 16, "residual_tokens": 100,
      "eviction": _ev(1, 8)}, 16, [150, 90] + [1] * 20),
])
def test_reference_attends_exactly_the_kept_positions(kvcomp, bs, chunks):
    cfg = KvcompConfig.from_dict(kvcomp)
    plain = KvcompConfig.from_dict({k: v for k, v in kvcomp.items() if k != "eviction"})
    T = sum(chunks)
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * REP, H, H))
    out, sim = _run(cfg, chunks, q, k, v, bs, poison_dropped=True)
    assert torch.isfinite(out).all()
    # the packed bytes do not depend on eviction: dequantize them from a run
    # without it, where no page was dropped
    out_plain, sim_plain = _run(plain, chunks, q, k, v, bs, poison_dropped=False)
    qT = plain.quantized_prefix_len(T)
    k_deq, v_deq = packing.dequantize_pages(sim_plain.packed, sim_plain.layout,
                                            sim_plain.block_table[0].long(), torch.float32)
    expected = _kept_float_attention(cfg, q, k, v, k_deq[:qT], v_deq[:qT], bs)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)
    # and eviction did change what some queries saw
    assert (out - out_plain).abs().max() > 1e-3


# --------------------------------------------------------------- start-up


@pytest.mark.parametrize("ev, message", [
    ({"method": "h2o"}, "eviction h2o needs budget_tokens"),
    ({"method": "a2sf", "budget_tokens": 64, "window": 8},
     "unknown kvcomp eviction setting(s) ['window']"),
    ({"method": "lru"}, "method='lru' is not supported"),
    ({"sink_tokens": 4}, "method=None is not supported"),
    ({"method": "streamingllm", "window": 3}, "unknown kvcomp eviction setting(s) ['window']"),
    ({"method": "streamingllm", "sink_tokens": 0}, "sink_tokens=0 must be a positive"),
    ({"method": "streamingllm", "recent_tokens": -5}, "recent_tokens=-5 must be a positive"),
    ({"method": "streamingllm", "recent_tokens": 2.5}, "recent_tokens=2.5 must be a positive"),
    ({"method": "streamingllm", "sink_tokens": True}, "sink_tokens=True must be a positive"),
    ("streamingllm", "eviction='streamingllm' must be a dict"),
])
def test_bad_eviction_settings_are_named(ev, message):
    with pytest.raises(KvcompConfigError) as e:
        KvcompConfig.from_dict({"eviction": ev})
    assert message in str(e.value)


def test_streamingllm_with_a_head_map_is_refused(tmp_path):
    """StreamingLLM would make the head map's retrieval heads stream too."""
    f = tmp_path / "map.json"
    f.write_text("{}")
    with pytest.raises(KvcompConfigError, match="'streamingllm' and head_map"):
        KvcompConfig.from_dict({"eviction": _ev(4, 64), "head_map": str(f)})


def test_gpu_platform_serves_streamingllm_through_vllms_config_path(tmp_path, monkeypatch):
    """StreamingLLM's Triton path has served on a GPU: a start-up with the
    platform check answering as a GPU would takes it with no further switch;
    a method that has not run there (A2SF, made one here) is refused through
    vLLM's config path, naming it."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_kvcomp import validation
    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    monkeypatch.delenv("KVCOMP_EVICTION_GPU", raising=False)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)

    def config(eviction):
        return EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024,
                          additional_config={"kvcomp": {"eviction": eviction}}
                          ).create_engine_config()

    assert config(_ev(4, 64)).additional_config["kvcomp"]["eviction"] == _ev(4, 64)
    monkeypatch.setattr(validation, "GPU_RUN_EVICTION", ("snapkv", "streamingllm", "h2o"))
    with pytest.raises(ValueError, match="method='a2sf'.* runs only on the CPU path"):
        config({"method": "a2sf", "budget_tokens": 256, "alpha": 0.5})


# --------------------------------------------------------------- end to end


def test_engine_with_eviction_end_to_end(tiny_llama):
    """A recent range longer than every sequence drops nothing: the tokens
    equal kvcomp's without eviction. A small window serves every request
    (prefix caching on, a second round of the same prompts), reports more
    capacity for the same memory, and gives every page back."""
    from e2e_util import POLICY_BASE as BASE, policy_spec, run_engines

    plain, wide, small = run_engines(
        dict(spec=policy_spec(tiny_llama, BASE), shared=True),
        dict(spec=policy_spec(tiny_llama, {**BASE, "eviction": _ev(4, 2048)})),
        dict(spec=policy_spec(tiny_llama, {**BASE, "eviction": _ev(4, 64)}, rounds=2)))
    assert wide["tokens"] == plain["tokens"]
    assert [len(t) for t in small["tokens"]] == [24] * 8
    assert small["tokens"][:4] == small["tokens"][4:]
    assert small["prefix_cache_hits"] == 0
    # packed pages for sinks + recent range + a step in flight (the residual
    # window group is unchanged): 1.8x here
    assert plain["kv_cache_tokens"] and small["kv_cache_tokens"] > 1.5 * plain["kv_cache_tokens"]
    assert small["kv_cache_usage"] == 0
    # the small window did change what long requests generate
    assert small["tokens"][:4] != plain["tokens"]
