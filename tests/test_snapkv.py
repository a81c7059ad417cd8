"""SnapKV eviction: the selection rule against a float reference, the move of
the kept tokens to the front of a request's pages, the attention over exactly
the kept positions, the block manager giving the emptied pages back, and the
engine end to end."""
import math
import random

import pytest
import torch

import vllm_kvcomp
from sim_paged import SimPagedCache, manager_on_pool
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.kernels.compaction import compact_kept
from vllm_kvcomp.policies.snapkv import SnapKV

vllm_kvcomp.register()


def _snap(**kw):
    return {"method": "snapkv", **kw}


# ------------------------------------------------------- the rule, in floats


def _float_snapkv(q_obs, k, P, window, kernel, pooling, num_kept, end):
    """The paper's rule, position by position in float64 Python: each
    observation query's softmax over the keys it sees, summed over the
    window, pooled over the prefix before the window (zero padding; average
    counts the padding, max ignores it), summed over each KV head's query
    group, the ``num_kept`` best of ``[0, end)`` per KV head (ties to the
    earlier position). q_obs [Hq, Tw, D] at positions [P - Tw, P), k [P, H, D]."""
    Hq, Tw, D = q_obs.shape
    H = k.shape[1]
    rep = Hq // H
    L = P - window
    qd, kd = q_obs.double(), k.double()
    kept = []
    for h in range(H):
        total = [0.0] * L
        for r in range(rep):
            hq = h * rep + r
            summed = [0.0] * L
            for t in range(Tw):
                p = P - Tw + t
                s = [float(qd[hq, t] @ kd[j, h]) / math.sqrt(D) for j in range(p + 1)]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for j in range(L):
                    summed[j] += e[j] / z
            half = kernel // 2
            for j in range(L):
                nb = [summed[i] for i in range(j - half, j + half + 1) if 0 <= i < L]
                total[j] += sum(nb) / kernel if pooling == "avg" else max(nb)
        order = sorted(range(end), key=lambda j: (-total[j], j))
        kept.append(sorted(order[:num_kept]))
    return kept


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_selection_matches_the_papers_rule(rep, pooling):
    g = torch.Generator().manual_seed(rep * 7 + len(pooling))
    H, D, bs, window = 2, 16, 16, 8
    for P, budget in ((203, 60), (150, 90), (77, 40)):
        policy = SnapKV(bs, budget, None, window, 7, pooling)
        kept_n, end = policy.plan(P, P - 20)
        q = torch.randn(P, H * rep, D, generator=g) * 2
        k = torch.randn(P, H, D, generator=g)
        # the window queries' softmax over their causal keys, as the step has them
        qo = q[P - window:].permute(1, 0, 2)  # [Hq, Tw, D]
        s = torch.einsum("htd,jhd->htj", qo, k.repeat_interleave(rep, 1)) / math.sqrt(D)
        pos = torch.arange(P)
        s.masked_fill_(pos[None, None, :] > (P - window + torch.arange(window))[None, :, None],
                       float("-inf"))
        probs = torch.softmax(s, -1)[:, :, : P - window]
        got = policy.select(policy.scores(probs, H)[:, :end], kept_n)
        want = _float_snapkv(qo, k, P, window, 7, pooling, kept_n, end)
        assert got.tolist() == want, (P, budget)


def test_plan_example():
    # 4,000-token prompt, 512-token budget, 128-token pages, 3,840 packed:
    # [3840, 4000) stays in the full-precision window, 512 packed are chosen
    p = SnapKV(128, 512)
    assert p.plan(4000, 3840) == (512, 3840)
    assert p.freed_pages(4000, 3840) == (4, 30)
    # the observation window reaching into the packed tokens: those stay in
    # place and count against the budget
    assert SnapKV(128, 512, None, 200).plan(4000, 3840) == (512 - 128, 3712)
    # no page to free: nothing is evicted
    assert p.plan(700, 512) is None and p.freed_pages(700, 512) == (0, 0)
    assert SnapKV(128, None, 0.25).plan(4000, 3840) == (1000, 3840)


# ------------------------------------------------------------- compaction


@pytest.mark.parametrize("kvcomp", [
    {"k_bits": 16, "v_bits": 16},
    {"k_bits": 2, "v_bits": 4, "key_axis": "token", "group_size": 16},
    {"k_bits": 4, "v_bits": 2, "group_size": 16},
])
def test_compaction_moves_each_heads_tokens(kvcomp):
    """Values and per-token or 16-bit keys arrive byte for byte; per-channel
    keys are the kept keys as stored, quantized again as the new groups."""
    cfg = KvcompConfig.from_dict({**kvcomp, "residual_tokens": 0})
    bs, H, D, T = 32, 3, 32, 200
    sim = SimPagedCache(cfg, bs, H, D, 1, T, seed=3)
    g = torch.Generator().manual_seed(5)
    k, v = torch.randn(T // 16 * 16, H, D, generator=g), torch.randn(T // 16 * 16, H, D, generator=g)
    from vllm_kvcomp.kernels.attention_ref import _handover

    row = sim.block_table[0]
    _handover(sim.packed, sim.layout, cfg, row, k, v, 0)
    k_st, v_st = packing.dequantize_pages(sim.packed, sim.layout, row.long(), torch.float32)
    before = sim.packed.clone()
    kept = torch.stack([torch.tensor(sorted(random.Random(h).sample(range(k.shape[0]), 37)))
                        for h in range(H)])
    compact_kept(sim.packed, sim.layout, row, kept, torch.float32)
    k2, v2 = packing.dequantize_pages(sim.packed, sim.layout, row.long(), torch.float32)
    heads = torch.arange(H)[:, None]
    assert torch.equal(v2[:37].transpose(0, 1), v_st[kept, heads])
    if cfg.k_bits == 16 or cfg.key_axis == "token":
        assert torch.equal(k2[:37].transpose(0, 1), k_st[kept, heads])
    else:
        G = cfg.group_size
        sel = k_st[kept, heads]  # [H, 37, D]
        sel = torch.cat([sel, sel[:, -1:].expand(H, 48 - 37, D)], 1).view(H, 3, G, D)
        codes, scale, mn = packing.quantize_lastdim(sel.transpose(-1, -2), cfg.k_bits)
        want = packing.dequantize_lastdim(codes, scale, mn).transpose(-1, -2).reshape(H, 48, D)
        torch.testing.assert_close(k2[:37].transpose(0, 1), want[:, :37], atol=0, rtol=0)
        # one more rounding, of at most half a step of the new groups
        assert (k2[:37].transpose(0, 1) - k_st[kept, heads]).abs().max() <= \
            scale.float().max() / 2 + 1e-6
    # pages past the kept tokens' (ceil(37 / 32) = 2 pages) are untouched
    assert torch.equal(sim.packed[row[2:].long()], before[row[2:].long()])


# --------------------------------------------------------------- attention

H, REP, D = 2, 2, 32


def _run(cfg, P, chunks, q, k, v, bs, poison_freed):
    """One request through the reference steps; with ``poison_freed`` the
    pages the manager gives back once the prompt is processed point at a
    page of 0xFF bytes (NaN scales), as a stale id might."""
    T = q.shape[0]
    sim = SimPagedCache(cfg, bs, H, D, 1, T, seed=1)
    sim.packed[0].fill_(0xFF)
    out = torch.zeros_like(q)
    c = 0
    for step in chunks:
        if poison_freed and cfg.eviction is not None and c >= P:
            lo, hi = cfg.eviction.policy(bs).freed_pages(P, cfg.quantized_prefix_len(P))
            sim.block_table[0, lo:hi] = 0
        n = c + step
        out[c:n] = sim.reference_step(q, k, v, c, n, P)
        c = n
    return out, sim


def _attend(qp, kk, vv):
    s = torch.einsum("hrd,khd->hrk", qp.view(H, REP, D).double(), kk.double()) * D ** -0.5
    return torch.einsum("hrk,khd->hrd", torch.softmax(s, -1), vv.double()).reshape(H * REP, D)


CASES = [
    # 16-bit: the kept tokens arrive exactly
    ({"k_bits": 16, "v_bits": 16, "residual_tokens": 16}, 16, 230, [230] + [1] * 12, 100),
    # generated tokens in the completing step (recompute after preemption)
    ({"k_bits": 4, "v_bits": 4, "key_axis": "token", "group_size": 16, "residual_tokens": 8},
     16, 190, [100, 110] + [1] * 10, 70),
    # chunk boundaries inside the window: it still scores as a whole
    ({"k_bits": 8, "v_bits": 4, "key_axis": "token", "group_size": 16, "residual_tokens": 8},
     16, 190, [100, 84, 3, 3] + [1] * 10, 70),
    # per-channel keys: kept keys regrouped
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16}, 32, 251,
     [120, 131] + [1] * 15, 96),
]


@pytest.mark.parametrize("kvcomp,bs,P,chunks,budget", CASES)
def test_reference_attends_exactly_the_kept_tokens(kvcomp, bs, P, chunks, budget):
    window = 8
    cfg = KvcompConfig.from_dict({**kvcomp, "eviction": _snap(budget_tokens=budget,
                                                              window=window)})
    plain = KvcompConfig.from_dict(kvcomp)
    policy = cfg.eviction.policy(bs)
    kept_n, end = policy.plan(P, cfg.quantized_prefix_len(P))
    T = sum(chunks)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * REP, H, H))
    q[P - window: P] *= 3  # peaked window attention: clear winners
    out, sim = _run(cfg, P, chunks, q, k, v, bs, poison_freed=True)
    assert torch.isfinite(out).all()
    out_plain, sim_plain = _run(plain, P, chunks, q, k, v, bs, poison_freed=False)
    # queries of the prompt see the whole cache (a completing chunk that runs
    # past the prompt is attended in two parts: float32 rounding differs)
    torch.testing.assert_close(out[:P], out_plain[:P], atol=1e-6, rtol=0)
    k_st, v_st = packing.dequantize_pages(sim_plain.packed, sim_plain.layout,
                                          sim_plain.block_table[0].long(), torch.float32)
    # the selection from the window queries over the cache as stored (packed
    # below Q(p), full precision from there)
    probs = []
    for p in range(P - window, P):
        b = cfg.quantized_prefix_len(p)
        kk = torch.cat([k_st[:b], k[b:p + 1]])
        s = torch.einsum("hrd,khd->hrk", q[p].view(H, REP, D), kk) * D ** -0.5
        probs.append(torch.softmax(s, -1)[..., : P - window].reshape(H * REP, -1))
    probs = torch.stack(probs, 1)
    kept = policy.select(policy.scores(probs, H)[:, :end], kept_n)
    # and the float rule on those probabilities picks the same tokens
    assert kept.shape == (H, kept_n)
    k_kept, v_kept = k_st[kept, torch.arange(H)[:, None]], v_st[kept, torch.arange(H)[:, None]]
    if cfg.k_bits < 16 and cfg.key_axis == "channel":
        k2, _ = packing.dequantize_pages(sim.packed, sim.layout, sim.block_table[0].long(),
                                         torch.float32)
        assert (k2[:kept_n].transpose(0, 1) - k_kept).abs().max() < 0.5
        k_kept = k2[:kept_n].transpose(0, 1)
    for p in range(P, T):
        b = cfg.quantized_prefix_len(p)
        exp = torch.zeros(H * REP, D, dtype=torch.float64)
        for h in range(H):
            kk = torch.cat([k_kept[h], k_st[end:b, h], k[b:p + 1, h]])
            vv = torch.cat([v_kept[h], v_st[end:b, h], v[b:p + 1, h]])
            s = (q[p, h * REP:(h + 1) * REP].double() @ kk.double().T) * D ** -0.5
            exp[h * REP:(h + 1) * REP] = torch.softmax(s, -1) @ vv.double()
        torch.testing.assert_close(out[p].double(), exp, atol=2e-5, rtol=1e-4)
    assert (out[P:] - out_plain[P:]).abs().max() > 1e-3


def test_budget_at_least_the_prompt_changes_nothing():
    kvcomp = {"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16}
    P, chunks, bs = 200, [128, 72] + [1] * 10, 16
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(sum(chunks), h, D, generator=g) for h in (H * REP, H, H))
    plain, _ = _run(KvcompConfig.from_dict(kvcomp), P, chunks, q, k, v, bs, False)
    for budget in ({"budget_tokens": P}, {"budget_ratio": 1.0}):
        cfg = KvcompConfig.from_dict({**kvcomp, "eviction": _snap(**budget)})
        out, _ = _run(cfg, P, chunks, q, k, v, bs, True)
        assert torch.equal(out, plain)


# ------------------------------------------------------------------ manager


def test_manager_frees_the_gap_once_the_prompt_is_processed():
    from vllm_kvcomp.residual_layer import packed_spec

    bs, P, chunk = 32, 1000, 256
    cfg = KvcompConfig.from_dict({"k_bits": 4, "v_bits": 4, "group_size": 32,
                                  "residual_tokens": 32, "eviction": _snap(budget_tokens=200)})
    spec = packed_spec(cfg, bs, 2, 64, torch.float32, chunk)
    pool, mgr = manager_on_pool(spec, 100, max_in_flight_tokens=chunk, max_model_len=4096)
    free0 = pool.get_num_free_blocks()
    kept_n, end = spec.policy.plan(P, spec.packed_tokens(P))
    c = 0
    for step in [chunk] * 3 + [P - 3 * chunk] + [1] * 40:
        n = c + step
        mgr.remove_skipped_blocks("r", c, P)
        held = [b for b in mgr.req_to_blocks.get("r", []) if not b.is_null]
        if c < P:  # the prompt holds all its pages while it is prefilled
            assert len(held) == len(mgr.req_to_blocks.get("r", []))
        else:
            q = spec.packed_tokens(c)
            assert len(held) == -(-kept_n // bs) + -(-q // bs) - end // bs
        mgr.allocate_new_blocks("r", n, n)
        assert pool.get_num_free_blocks() == free0 - len(
            [b for b in mgr.req_to_blocks["r"] if not b.is_null])
        c = n
    # held after the prompt: ceil(kept / bs) moved pages + the tail from `end`
    assert (kept_n, end) == (200, 960)
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


# --------------------------------------------------------------- settings


@pytest.mark.parametrize("ev, message", [
    (_snap(), "exactly one of budget_tokens"),
    (_snap(budget_tokens=10, budget_ratio=0.5), "exactly one of budget_tokens"),
    (_snap(budget_ratio=1.5), "budget_ratio=1.5 must be in (0, 1]"),
    (_snap(budget_ratio=0), "budget_ratio=0 must be in (0, 1]"),
    (_snap(budget_tokens=0), "budget_tokens=0 must be a positive"),
    (_snap(budget_tokens=64, kernel=4), "kernel=4 must be odd"),
    (_snap(budget_tokens=64, window=0), "window=0 must be a positive"),
    (_snap(budget_tokens=64, pooling="mean"), "pooling='mean' is not supported"),
    (_snap(budget_tokens=64, sink_tokens=4), "unknown kvcomp eviction setting(s) ['sink_tokens']"),
])
def test_bad_snapkv_settings_are_named(ev, message):
    with pytest.raises(KvcompConfigError) as e:
        KvcompConfig.from_dict({"eviction": ev})
    assert message in str(e.value)


# --------------------------------------------------------------- end to end


def test_engine_pool_holds_the_budget_and_reuses_freed_pages(tiny_llama, tmp_path):
    """~4K-token prompts at a 512-token budget beside short ones, in a pool too
    small for four whole prompts, some requests aborted: once its prompt is
    processed a request holds exactly the pages of the SnapKV layout (read
    from vLLM's block manager after every step), pages it gave back serve
    other requests, and the pool ends empty. (13 requests here, for time; the
    same run at larger counts is a matter of patience.)"""
    from e2e_util import POLICY_BASE, check_snapkv_pool, eviction_pool_run

    check_snapkv_pool(eviction_pool_run(tmp_path, dict(
        model=tiny_llama, kvcomp={**POLICY_BASE, "eviction": _snap(budget_tokens=512)},
        engine=dict(max_num_batched_tokens=1024, max_num_seqs=4, num_gpu_blocks_override=600),
        long=[4000, 3900, 4100, 4050, 3999], short=[50, 300, 700, 120, 900, 60, 33, 510],
        max_tokens=8, abort_every=4, in_flight=6, seed=1)), requests=13)


def test_engine_budget_covering_the_context_changes_nothing(tiny_llama):
    """A budget at least as long as every prompt evicts nothing: the tokens
    equal kvcomp's without eviction, at 16 bits and at 4 bits. A small budget
    does change what long prompts generate."""
    from e2e_util import POLICY_BASE, POLICY_K16, policy_spec, run_engines

    def run(kvcomp, shared=False):
        return dict(spec=policy_spec(tiny_llama, kvcomp), shared=shared)

    wide = {"eviction": _snap(budget_tokens=2048)}
    plain16, wide16, plain, wide4, small = run_engines(
        run(POLICY_K16, shared=True), run({**POLICY_K16, **wide}),
        run(POLICY_BASE, shared=True), run({**POLICY_BASE, **wide}),
        run({**POLICY_BASE, "eviction": _snap(budget_tokens=128)}))
    assert wide16["tokens"] == plain16["tokens"]
    assert wide4["tokens"] == plain["tokens"]
    assert small["tokens"][1:3] != plain["tokens"][1:3]
    assert small["tokens"][3] == plain["tokens"][3]  # 40 tokens: nothing to evict


# ---------------------------------------------------------------- start-up


def test_start_up_asks_vllm_for_prompt_lengths_on_either_platform(tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    kvcomp = {"eviction": _snap(budget_ratio=0.25)}
    args = EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024,
                      additional_config={"kvcomp": kvcomp})
    # the runner passes prompt lengths to attention metadata only then
    assert args.create_engine_config().model_config.rswa_window is not None
    plain = EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024)
    assert plain.create_engine_config().model_config.rswa_window is None
    # SnapKV's Triton path has served on a GPU: a GPU start-up takes it as it is
    monkeypatch.delenv("KVCOMP_EVICTION_GPU", raising=False)
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)
    gpu = EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024,
                     additional_config={"kvcomp": kvcomp}).create_engine_config()
    assert gpu.model_config.rswa_window is not None
