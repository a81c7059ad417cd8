"""H2O and A2SF: kept sets against a float reference of the papers' rules,
the serving path's scores, kept sets and outputs against the rule in page
steps, the block manager's frees, and the engine end to end."""
import math
from types import SimpleNamespace

import pytest
import torch

import vllm_kvcomp
from sim_paged import SimPagedCache, manager_on_pool
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.kernels.h2o_ref import score_view
from vllm_kvcomp.policies.a2sf import A2SF
from vllm_kvcomp.policies.h2o import H2O

vllm_kvcomp.register()


def _float_rule(q, k, P, budget, recent, alpha):
    """Position by position in float64 Python: the prompt's queries attend
    causally (nothing evicted yet), each later query attends the kept tokens
    and itself; a token's score is sum_q alpha ** (n - q) * S_q summed over
    its KV head's query heads (alpha 1: H2O); after the prompt and after each
    step, the lowest scores outside the last ``recent`` tokens are evicted
    down to ``budget`` (ties: the earlier token). Returns the kept positions
    per KV head after every step from the prompt on."""
    T, Hq, D = q.shape
    H = k.shape[1]
    rep = Hq // H
    score = [[0.0] * T for _ in range(H)]
    kept = [set() for _ in range(H)]
    history = []
    for t in range(T):
        for h in range(H):
            kept[h].add(t)
            keys = sorted(j for j in kept[h] if j <= t) if t >= P else list(range(t + 1))
            for j in range(T):
                score[h][j] *= alpha
            for r in range(rep):
                s = [sum(float(q[t, h * rep + r, d]) * float(k[j, h, d]) for d in range(D))
                     / math.sqrt(D) for j in keys]
                m = max(s)
                e = [math.exp(x - m) for x in s]
                z = sum(e)
                for j, x in zip(keys, e):
                    score[h][j] += x / z
        if t >= P - 1:
            n = t + 1
            for h in range(H):
                movable = sorted((j for j in kept[h] if j < n - recent),
                                 key=lambda j: (score[h][j], j))
                for j in movable[: max(0, len(kept[h]) - budget)]:
                    kept[h].discard(j)
            history.append([sorted(s) for s in kept])
    return history


def _policy_run(policy, q, k, P):
    """The same sequence through the policy: probabilities of each step's
    queries over the kept keys, ``accumulate``, ``evict``."""
    T, Hq, D = q.shape
    H = k.shape[1]
    rep = Hq // H
    scores = torch.zeros(H, T, dtype=torch.float64)
    kept = torch.zeros(H, T, dtype=torch.bool)

    def probs(t0, t1, visible):
        s = torch.einsum("thd,jhd->htj", q[t0:t1].double(),
                         k.double().repeat_interleave(rep, 1)) / math.sqrt(D)
        s.masked_fill_(~visible, float("-inf"))
        return torch.softmax(s, -1)

    causal = torch.arange(T)[None, :] <= torch.arange(P)[:, None]
    scores = policy.accumulate(scores, probs(0, P, causal[None]), H)
    kept[:, :P] = True
    kept = policy.evict(scores, kept, P)
    history = [[row.nonzero().squeeze(1).tolist() for row in kept]]
    for t in range(P, T):
        kept[:, t] = True
        vis = kept.repeat_interleave(rep, 0)[:, None, :]
        scores = policy.accumulate(scores, probs(t, t + 1, vis), H)
        kept = policy.evict(scores, kept, t + 1)
        history.append([row.nonzero().squeeze(1).tolist() for row in kept])
    return history


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_kept_sets_match_the_papers_rule(rep, alpha):
    g = torch.Generator().manual_seed(rep * 10 + int(alpha * 10))
    H, D = 2, 8
    for P, T, budget, recent in ((37, 60, 20, 8), (50, 71, 33, 5)):
        q = torch.randn(T, H * rep, D, generator=g) * 1.5
        k = torch.randn(T, H, D, generator=g)
        policy = H2O(budget, recent) if alpha == 1.0 else A2SF(budget, recent, alpha)
        got = _policy_run(policy, q, k, P)
        want = _float_rule(q, k, P, budget, recent, alpha)
        assert got == want
        assert all(len(s) == budget for step in got for s in step)


def test_forgetting_changes_what_is_kept():
    g = torch.Generator().manual_seed(3)
    q, k = torch.randn(60, 4, 8, generator=g) * 2, torch.randn(60, 2, 8, generator=g)
    assert _policy_run(H2O(16, 4), q, k, 30)[-1] != _policy_run(A2SF(16, 4, 0.2), q, k, 30)[-1]


def test_bad_policy_parameters():
    with pytest.raises(ValueError, match="recent_tokens=9 exceeds"):
        H2O(8, 9)
    with pytest.raises(ValueError, match="alpha=0 must be in"):
        A2SF(8, 4, 0)


# ------------------------------------------------------------ serving path

H, D = 2, 16


def _ev(method, budget, recent, alpha=None):
    ev = {"method": method, "budget_tokens": budget, "recent_tokens": recent}
    if alpha is not None:
        ev["alpha"] = alpha
    return ev


def _serve(cfg, P, chunks, q, k, v, bs, poison_freed, record=None):
    """One request through the reference steps (``kvcomp_step_reference``);
    with ``poison_freed`` every page the manager has given back points at a
    page of 0xFF bytes (NaN scales), as a stale id might. ``record``: after
    each step, the policy's layout and the request's scores and 16-bit keys
    by slot."""
    T = q.shape[0]
    sim = SimPagedCache(cfg, bs, H, D, 1, T, seed=1)
    sim.packed[0].fill_(0xFF)
    policy = cfg.eviction.policy(bs) if cfg.eviction is not None else None
    out = torch.zeros_like(q)
    c = 0
    for step in chunks:
        n = c + step
        out[c:n] = sim.reference_step(q, k, v, c, n, P)
        c = n
        if policy is not None and poison_freed:
            lo, hi = policy.freed_pages(c, cfg.quantized_prefix_len(c), P)
            sim.block_table[0, lo:hi] = 0
        if record is not None:
            K, E = policy.layout(c, cfg.quantized_prefix_len(c), P)
            row = sim.block_table[0].long()
            scores = score_view(sim.packed, sim.layout)[row].transpose(0, 1).reshape(H, -1)
            keys, _ = packing.dequantize_pages(sim.packed, sim.layout, row, torch.float32)
            record.append((c, K, E, scores.clone(), keys.clone()))
    return out, sim


def _paged_rule(q, k, v, P, chunks, policy, q_len):
    """H2O / A2SF in page steps, in float64: each step's queries attend the
    kept tokens of the step's start (a prompt: everything before it) and
    their own causal range; a token's score is ``rule.accumulate``'s; when
    the layout moves, ``H2O.evict`` with the recent window ``n - E`` and the
    budget ``K + n - E`` decides what stays. Returns, per step, the kept
    positions below ``E`` per head, the scores ``[H, n]`` and the outputs."""
    T, Hq, _ = q.shape
    rep = Hq // H
    scores = torch.zeros(H, T, dtype=torch.float64)
    kept = torch.zeros(H, T, dtype=torch.bool)  # cached and not evicted
    outs, history = torch.zeros(T, Hq, D, dtype=torch.float64), []
    c = 0
    for step in chunks:
        n = c + step
        kept[:, c:n] = True
        pos = torch.arange(T)
        vis = kept[:, None, :] & (pos[None, None, :] <= torch.arange(c, n)[None, :, None])
        s = torch.einsum("thd,jhd->htj", q[c:n].double(),
                         k.double().repeat_interleave(rep, 1)) * D ** -0.5
        s.masked_fill_(~vis.repeat_interleave(rep, 0), float("-inf"))
        probs = torch.softmax(s, -1)
        outs[c:n] = torch.einsum("htj,jhd->thd", probs, v.double().repeat_interleave(rep, 1))
        scores = policy.rule.accumulate(scores, probs, H)
        K, E = policy.layout(n, q_len(n), P)
        if E > 0 and (K, E) != policy.layout(c, q_len(c), P):
            rule = H2O(K + n - E, n - E)
            kept[:, :n] = rule.evict(scores[:, :n], kept[:, :n], n)
        history.append(([kept[h, :E].nonzero().squeeze(1) for h in range(H)], scores.clone()))
        c = n
    return history, outs


# a prompt of 45 tokens in two chunks, then decode steps; or, as a preempted
# request recomputes, its prompt and 25 generated tokens in one step that
# completes the prompt, then decode steps
SERVED_CHUNKS = {"decode": [30, 15] + [1] * 60, "recompute": [30, 40] + [1] * 35}


@pytest.mark.parametrize("chunks", list(SERVED_CHUNKS))
@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("method,alpha", [("h2o", None), ("a2sf", 0.7)])
def test_served_scores_and_kept_sets_equal_the_rule(rep, method, alpha, chunks):
    """16-bit keys (exact in the pages), a prompt off the page size, then
    decode steps through many eviction steps: after every step the scores in
    the pages' score slots (moved with their tokens) equal the float rule's
    accumulated scores (rtol 1e-5), the keys in slots ``[0, K)`` are those of
    the rule's kept positions in order, and the outputs equal the rule's
    attention over the kept tokens (1e-5)."""
    bs, P, budget, recent = 16, 45, 40, 12
    cfg = KvcompConfig.from_dict({"k_bits": 16, "v_bits": 16, "residual_tokens": 8,
                                  "eviction": _ev(method, budget, recent, alpha)})
    policy = cfg.eviction.policy(bs)
    chunks = SERVED_CHUNKS[chunks]
    T = sum(chunks)
    g = torch.Generator().manual_seed(rep * 7 + (alpha is None))
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * rep, H, H))
    q *= 2  # peaked attention: scores far apart
    record = []
    out, _ = _serve(cfg, P, chunks, q, k, v, bs, poison_freed=True, record=record)
    want, want_out = _paged_rule(q, k, v, P, chunks, policy, cfg.quantized_prefix_len)
    evictions = 0
    for (n, K, E, scores, keys), (kept, ref_scores) in zip(record, want):
        for h in range(H):
            assert kept[h].numel() == K, (n, h)
            slots = torch.cat([torch.arange(K), torch.arange(E, n)])
            positions = torch.cat([kept[h], torch.arange(E, n)])
            torch.testing.assert_close(scores[h, slots].double(), ref_scores[h, positions],
                                       rtol=1e-5, atol=1e-6)
            assert torch.equal(keys[:K, h], k[kept[h], h]), (n, h)
        evictions += K < E
    assert evictions > 20  # eviction steps, not one
    torch.testing.assert_close(out.double(), want_out, rtol=1e-5, atol=1e-5)


def test_recompute_after_preemption_keeps_the_layout_not_the_set():
    """A request recomputed after 25 decode steps (its prompt and generated
    tokens in one prefill) ends in the same layout, the same pages held, as
    without preemption, but the decode steps' scores from before are gone
    and its prefill attended without eviction: the kept tokens differ."""
    bs, P = 16, 45
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(105, h, D, generator=g) for h in (H * 2, H, H))
    q *= 2
    cfg = KvcompConfig.from_dict({"k_bits": 16, "v_bits": 16, "residual_tokens": 8,
                                  "eviction": _ev("h2o", 40, 12)})
    ends = []
    for chunks in ([P] + [1] * 60, [P + 25] + [1] * 35):
        record = []
        _serve(cfg, P, chunks, q, k, v, bs, poison_freed=True, record=record)
        ends.append(record[-1])
    (n0, K0, E0, _, keys0), (n1, K1, E1, _, keys1) = ends
    assert (n0, K0, E0) == (n1, K1, E1) and K0 < E0
    assert not torch.equal(keys0[:K0], keys1[:K1])


def test_a2sf_forgets_what_h2o_keeps():
    """The same inputs served under H2O and A2SF keep different tokens."""
    bs, P = 16, 45
    chunks = [45] + [1] * 60
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(105, h, D, generator=g) for h in (H * 2, H, H))
    q *= 2
    kept = []
    for ev in (_ev("h2o", 40, 12), _ev("a2sf", 40, 12, 0.5)):
        cfg = KvcompConfig.from_dict({"k_bits": 16, "v_bits": 16, "residual_tokens": 8,
                                      "eviction": ev})
        record = []
        _serve(cfg, P, chunks, q, k, v, bs, poison_freed=True, record=record)
        n, K, E, _, keys = record[-1]
        kept.append(keys[:K])
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("kvcomp", [
    {"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16},
    {"k_bits": 2, "v_bits": 4, "key_axis": "token", "group_size": 16, "residual_tokens": 8},
    {"k_bits": 16, "v_bits": 16, "residual_tokens": 0, "key_axis": "token"},
])
@pytest.mark.parametrize("method", ["h2o", "a2sf"])
def test_quantized_pages_evict_and_a_wide_budget_changes_nothing(kvcomp, method):
    """k_bits / v_bits 4, 2 and 16: with a budget covering the context the
    outputs equal the same bits without eviction, bit for bit; with a small
    one, freed pages (poisoned) are never read and the outputs differ."""
    bs, P = 16, 77
    chunks = [50, 27] + [1] * 70
    T = sum(chunks)
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(T, h, D, generator=g) for h in (H * 4, H, H))
    alpha = 0.5 if method == "a2sf" else None
    plain, _ = _serve(KvcompConfig.from_dict(kvcomp), P, chunks, q, k, v, bs, False)
    wide = KvcompConfig.from_dict({**kvcomp, "eviction": _ev(method, T, 16, alpha)})
    out, _ = _serve(wide, P, chunks, q, k, v, bs, poison_freed=True)
    assert torch.equal(out, plain)
    small = KvcompConfig.from_dict({**kvcomp, "eviction": _ev(method, 40, 16, alpha)})
    record = []
    out, _ = _serve(small, P, chunks, q, k, v, bs, poison_freed=True, record=record)
    assert torch.isfinite(out).all()
    assert (out[P:] - plain[P:]).abs().max() > 1e-3
    assert any(K < E for _, K, E, _, _ in record)


@pytest.mark.parametrize("budget, recent, alpha, message", [
    (None, None, None, "h2o needs budget_tokens"),
    (0, None, None, "budget_tokens=0 must be a positive"),
    (64, 65, None, "recent_tokens=65 exceeds budget_tokens=64"),
    (64, 0, None, "recent_tokens=0 must be a positive"),
])
def test_bad_h2o_settings_are_named(budget, recent, alpha, message):
    ev = {"method": "h2o"}
    for name, x in (("budget_tokens", budget), ("recent_tokens", recent)):
        if x is not None:
            ev[name] = x
    with pytest.raises(KvcompConfigError) as e:
        KvcompConfig.from_dict({"eviction": ev})
    assert message in str(e.value)


def test_bad_a2sf_settings_are_named():
    for alpha in (0, 1.5, True):
        with pytest.raises(KvcompConfigError, match="alpha=.* must be in"):
            KvcompConfig.from_dict({"eviction": _ev("a2sf", 64, 8, alpha)})
    with pytest.raises(KvcompConfigError, match=r"unknown kvcomp eviction setting\(s\) \['alpha'\]"):
        KvcompConfig.from_dict({"eviction": _ev("h2o", 64, 8, 0.5)})
    # the paper's split: half the budget recent unless given
    assert KvcompConfig.from_dict({"eviction": {"method": "a2sf", "budget_tokens": 64}}
                                  ).eviction.recent_tokens == 32


# ------------------------------------------------------------------ manager


@pytest.mark.parametrize("kvcomp", [
    {"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32},
    {"k_bits": 2, "v_bits": 2, "key_axis": "token", "residual_tokens": 0},
])
def test_manager_frees_the_evicted_pages_where_the_worker_empties_them(kvcomp):
    """The block manager, told only the processed tokens and the prompt
    length, holds after each step exactly the pages of the layout the worker
    compacts to: every page of the prompt while it is prefilled, then the
    heavy hitters' pages and those from ``E`` on; the pool gets the rest."""
    from vllm_kvcomp.residual_layer import packed_spec

    bs, P, chunk, budget = 32, 700, 256, 200
    cfg = KvcompConfig.from_dict({**kvcomp, "eviction": _ev("h2o", budget, 64)})
    spec = packed_spec(cfg, bs, 2, 64, torch.float32, chunk)
    pool, mgr = manager_on_pool(spec, 100, max_in_flight_tokens=chunk, max_model_len=4096)
    free0 = pool.get_num_free_blocks()
    c = 0
    most = 0
    for step in [chunk, chunk, P - 2 * chunk] + [1] * 300:
        n = c + step
        mgr.remove_skipped_blocks("r", c, P)
        row = mgr.req_to_blocks.get("r", [])
        held = [not b.is_null for b in row]
        K, E = spec.policy.layout(c, spec.packed_tokens(c), P)
        want = [i < -(-K // bs) or i >= E // bs for i in range(len(row))]
        assert held == want, c
        if c > P:
            # the budget plus a page of slack, and the window not yet packed
            assert sum(held) * bs <= budget + bs + (c - spec.packed_tokens(c)) + 2 * bs
            most = max(most, sum(held))
        mgr.allocate_new_blocks("r", n, n)
        assert len(mgr.req_to_blocks["r"]) == -(-n // bs)  # a page per cached token
        # compacted pages are rewritten: none gets a prefix-cache hash
        mgr.cache_blocks(SimpleNamespace(request_id="r"), n)
        assert all(b.block_hash is None for b in mgr.req_to_blocks["r"])
        assert pool.get_num_free_blocks() == free0 - sum(
            not b.is_null for b in mgr.req_to_blocks["r"])
        c = n
    assert 0 < most < -(-P // bs)
    blocks, h = type(mgr).find_longest_cache_hit(list(range(8)), 1024, [0], pool, spec,
                                                  False, bs)
    assert h == 0 and blocks == ([],)
    mgr.free("r")
    assert pool.get_num_free_blocks() == free0


def test_start_up_asks_for_prompt_lengths_and_a_gpu_serves_both(tmp_path, monkeypatch):
    """H2O's and A2SF's Triton paths have served on a GPU: a GPU start-up
    takes both and asks vLLM for prompt lengths; a method the GPU path does
    not have is refused there, with the ones it has named."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms import current_platform

    from vllm_kvcomp import validation
    from vllm_kvcomp.tiny_model import make_tiny_llama
    from vllm_kvcomp.validation import check_eviction_platform

    model = make_tiny_llama(str(tmp_path / "tiny"))

    def config(method):
        return EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024,
                          additional_config={"kvcomp": {"eviction": _ev(method, 512, 64)}}
                          ).create_engine_config()

    # the runner passes prompt lengths to attention metadata only then
    assert config("a2sf").model_config.rswa_window is not None
    monkeypatch.delenv("KVCOMP_EVICTION_GPU", raising=False)
    for method in ("h2o", "a2sf"):
        cfg = KvcompConfig.from_dict({"eviction": _ev(method, 512, 64)})
        check_eviction_platform(cfg, on_cpu=True)
        check_eviction_platform(cfg, on_cpu=False)
    # a method that has not served on a GPU is refused there unless asked for
    monkeypatch.setattr(validation, "GPU_RUN_EVICTION", ("snapkv", "streamingllm", "h2o"))
    with pytest.raises(KvcompConfigError, match="method='a2sf'.* runs only on the CPU"):
        check_eviction_platform(KvcompConfig.from_dict({"eviction": _ev("a2sf", 512, 64)}),
                                on_cpu=False)
    monkeypatch.setenv("KVCOMP_EVICTION_GPU", "1")
    check_eviction_platform(KvcompConfig.from_dict({"eviction": _ev("a2sf", 512, 64)}),
                            on_cpu=False)
    monkeypatch.undo()
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)
    for method in ("h2o", "a2sf"):
        assert config(method).model_config.rswa_window is not None


# --------------------------------------------------------------- end to end


def _engine_ev(method, budget, recent=None):
    ev = {"method": method, "budget_tokens": budget}
    if recent is not None:
        ev["recent_tokens"] = recent
    if method == "a2sf":
        ev["alpha"] = 0.5
    return ev


def test_engine_budget_covering_the_context_changes_nothing(tiny_llama):
    """A budget at least as long as every request evicts nothing: the tokens
    equal kvcomp's without eviction at 16 bits (H2O) and at 4 bits (A2SF). A
    small budget does change what the long prompts generate, not what the
    40-token one does; served twice with prefix caching on, the second round
    finds no hit (compacted pages are never hashed) and generates the same
    tokens, and the pool ends empty."""
    from e2e_util import POLICY_BASE, POLICY_K16, policy_spec, run_engines

    def run(kvcomp, shared=False, rounds=1):
        return dict(spec=policy_spec(tiny_llama, kvcomp, rounds=rounds), shared=shared)

    plain16, wide16, plain, wide4, small = run_engines(
        run(POLICY_K16, shared=True), run({**POLICY_K16, "eviction": _engine_ev("h2o", 2048)}),
        run(POLICY_BASE, shared=True), run({**POLICY_BASE, "eviction": _engine_ev("a2sf", 2048)}),
        run({**POLICY_BASE, "eviction": _engine_ev("h2o", 128, 64)}, rounds=2))
    assert wide16["tokens"] == plain16["tokens"]
    assert wide4["tokens"] == plain["tokens"]
    assert small["tokens"][2] != plain["tokens"][2]
    assert small["tokens"][3] == plain["tokens"][3]
    assert small["tokens"][:4] == small["tokens"][4:]
    assert small["prefix_cache_hits"] == 0 and small["kv_cache_usage"] == 0


def test_engine_decode_holds_the_budget_and_the_pool_ends_empty(tiny_llama, tmp_path):
    """Mixed prompts (40 to 1500 tokens) decoding 96 tokens each, some
    aborted: after every step each request past its prompt holds exactly
    the pages of the policy's layout (read from vLLM's block manager), at
    most the budget plus a page of slack plus the pages of the
    full-precision window; pages given back serve other requests; the pool
    ends as it started."""
    from e2e_util import POLICY_BASE, eviction_pool_run

    budget, recent, bs = 256, 64, POLICY_BASE["block_size"]
    spec = dict(model=tiny_llama,
                kvcomp={**POLICY_BASE, "eviction": _engine_ev("a2sf", budget, recent)},
                engine=dict(max_num_batched_tokens=512, max_num_seqs=4, max_model_len=2048),
                lengths=[1500, 60, 900, 1200, 300, 40, 700], max_tokens=96,
                abort_every=5, in_flight=5, seed=1)
    r = eviction_pool_run(tmp_path, spec)
    assert r["checked"] > 200 and r["mismatches"] == [], r["mismatches"]
    # heavy hitters' pages, a page of slack, the recent tokens and the
    # window not yet packed (residual 32 + a key group of 32 - 1), the token
    # in flight
    window = POLICY_BASE["residual_tokens"] + POLICY_BASE["group_size"] - 1
    bound = -(-(budget - recent) // bs) + -(-(recent + bs + max(0, window - recent) + 1) // bs)
    assert r["most_held"] and max(r["most_held"].values()) <= bound, r["most_held"]
    assert r["reused"] > 0
    assert r["aborted"] > 0 and r["finished"] + r["aborted"] == 7
    assert r["free_end"] == r["free_start"] and r["usage"] == 0


def test_engine_tight_pool_preempts_and_serves_every_request(tiny_llama):
    """Five long prompts on a pool that holds barely two of them while they
    are prefilled: vLLM preempts and recomputes, and every request returns
    its whole output. (A request recomputed after some decode steps re-derives
    its kept set from the recompute's prefill, ``PagedH2O``'s docstring, so
    its tokens are not compared.)"""
    from e2e_util import POLICY_BASE, run_engine, token_prompts

    spec = dict(model=tiny_llama, backend="kvcomp",
                kvcomp={**POLICY_BASE, "eviction": _engine_ev("h2o", 256, 64)},
                engine=dict(max_model_len=2048, max_num_batched_tokens=512, max_num_seqs=4,
                            num_gpu_blocks_override=110),
                prompts=token_prompts([1500, 1200, 1700, 900, 1300], seed=4), max_tokens=48)
    r = run_engine(spec, timeout=1200)
    assert r["preemptions"] > 0
    assert [len(t) for t in r["tokens"]] == [48] * 5
