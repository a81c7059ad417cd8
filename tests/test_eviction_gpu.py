"""Eviction on the GPU (Triton) path, under the interpreter: the evicted
ranges the kernels skip against the policies, H2O / A2SF's scores from the
decode kernel against the reference's, and the backend's Triton steps
(store, decode and prefill kernels skipping the evicted pages, SnapKV's and
H2O / A2SF's selection beside them) against the reference steps, over requests whose
freed pages point at a page of NaNs. The engine end to end is in
test_e2e_triton_path.py."""
import random

import pytest
import torch

import vllm_kvcomp
from sim_paged import SimPagedCache
from vllm_kvcomp.config import SCORED_EVICTION, KvcompConfig, KvcompConfigError
from vllm_kvcomp.kernels.attention_ref import kvcomp_step_reference
from vllm_kvcomp.kernels.eviction_gpu import evicted_ranges, evicted_ranges_reference

vllm_kvcomp.register()

# the Triton steps' tensors: on a GPU where there is one (the interpreter
# only runs without one); the references and the bookkeeping on the host
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# 64 channels on a GPU: the 2-bit key phases' tensor-core dots (a quarter of the
# head's channels each) need 16 (check_decode_launch refuses smaller heads)
H, REP, D = 2, 2, 64 if DEVICE == "cuda" else 32


# ------------------------------------------------------------ evicted ranges

RANGE_CONFIGS = [
    {"eviction": {"method": "snapkv", "budget_tokens": 40, "window": 8}},
    {"eviction": {"method": "snapkv", "budget_ratio": 0.3, "window": 16},
     "residual_tokens": 48, "group_size": 32},
    {"eviction": {"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 24}},
    {"eviction": {"method": "streamingllm", "sink_tokens": 20, "recent_tokens": 40},
     "k_bits": 4, "v_bits": 4, "key_axis": "token", "group_size": 16, "residual_tokens": 8},
    {"eviction": {"method": "h2o", "budget_tokens": 64}},
    {"eviction": {"method": "a2sf", "budget_tokens": 48, "recent_tokens": 20, "alpha": 0.5},
     "residual_tokens": 16},
]


@pytest.mark.parametrize("kvcomp", RANGE_CONFIGS,
                         ids=lambda c: c["eviction"]["method"] + str(len(c)))
@pytest.mark.parametrize("bs", [16, 32])
def test_evicted_ranges_are_the_policies(kvcomp, bs):
    """The device ranges (torch ops, no host sync) equal what the reference
    path asks the policy objects, over prompts, chunks and decode steps."""
    cfg = KvcompConfig.from_dict(kvcomp)
    rng = random.Random(bs)
    P = [rng.randrange(1, 600) for _ in range(400)]
    n = [p + rng.choice([-rng.randrange(0, p), 0, rng.randrange(1, 300)]) for p in P]
    n = [max(1, x) for x in n]
    t = [rng.choice([1, 1, rng.randrange(1, x + 1)]) for x in n]
    got = evicted_ranges(cfg, bs, torch.tensor(n, dtype=torch.int32),
                         torch.tensor(t, dtype=torch.int32), torch.tensor(P, dtype=torch.int32))
    want = evicted_ranges_reference(cfg, bs, n, t, P)
    assert got.dtype == torch.int32
    assert got.tolist() == [list(w) for w in want]
    assert any(hi > lo for lo, hi in want)  # the cases evict something


# ------------------------------------- H2O / A2SF: the decode kernel's scores

PROB_CASES = [  # (bits, key axis, group, window, head size, GQA, dtype, warp tiles)
    ((4, 4), "channel", 16, 8, 64, 1, torch.float32, None),
    ((2, 2), "channel", 32, 16, 64, 4, torch.float32, None),
    ((4, 2), "token", 16, 8, 64, 8, torch.float32, None),
    ((16, 16), "channel", 16, 8, 32, 4, torch.float32, None),
    ((4, 4), "channel", 64, 16, 64, 4, torch.float32, 4),
    ((8, 8), "channel", 16, 8, 64, 4, torch.bfloat16, None),
    ((2, 2), "token", 16, 8, 64, 8, torch.bfloat16, None),
]


@pytest.mark.parametrize("bits,axis,G,R,D,rep,dtype,wt", PROB_CASES,
                         ids=[f"k{c[0][0]}v{c[0][1]}-{c[1]}-g{c[2]}-rep{c[5]}-"
                              f"{str(c[6])[6:]}-wt{c[7]}" for c in PROB_CASES])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_kernel_probs_are_the_reference_probs(bits, axis, G, R, D, rep, dtype, wt,
                                                     splits):
    """The decode kernel's per-position probabilities (its own logits,
    normalised by the merged splits' sums) equal the reference attention's,
    over lengths that are not block or group multiples, and its output is
    the one it gives without them."""
    from vllm_kvcomp.kernels.decode_batch import DecodeBatch, lens_for
    from vllm_kvcomp.kernels.triton_decode import decode_probs_reference

    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_tokens=R,
                       key_axis=axis)
    batch = DecodeBatch(cfg, lens_for(cfg), D=D, rep=rep, dtype=dtype, block_size=max(32, G),
                        seed=G + rep)
    L = max(batch.lens) + 5
    probs = torch.full((len(batch.lens), batch.query.shape[1], L), 7.0, device=DEVICE)
    kw = {"warp_tiles": wt} if wt else {}
    out = batch.triton(num_splits=splits, probs=probs, device=DEVICE, **kw)
    want = decode_probs_reference(*batch.args(), L)
    # a GPU's 16-bit tensor-core dots round the query to the model dtype (8 mantissa bits
    # in bf16): logits off by up to |logit| / 2^8, a few percent of a probability; fp32
    # (and the interpreter's fp32 dots) agree to rounding
    gpu16 = DEVICE == "cuda" and dtype != torch.float32
    atol, rtol = (1e-3, 5e-2) if gpu16 else (2e-6, 1e-4)
    torch.testing.assert_close(probs.cpu().double(), want, atol=atol, rtol=rtol)
    assert torch.equal(out, batch.triton(num_splits=splits, device=DEVICE, **kw))
    assert (want[:, :, max(batch.lens):] == 0).all() and (want > 0.01).any()


@pytest.mark.parametrize("bits,axis,G,R,D,rep,dtype,wt", [PROB_CASES[1], PROB_CASES[4]],
                         ids=["k2v2-rep4", "k4v4-g64-wt4"])
def test_decode_kernel_logits_with_their_lse_are_its_probs(bits, axis, G, R, D, rep, dtype, wt):
    """With ``probs_lse`` the decode kernel leaves its base-2 logits in
    ``probs`` (positions not read untouched) and the rows' log-sum-exps in
    ``probs_lse``: ``exp2(logit - lse)`` is the probability the normalising
    call writes (to an ulp or two: torch's vectorised exp2 and its scalar
    tail round apart), and the output is the same bit for bit."""
    from vllm_kvcomp.kernels.decode_batch import DecodeBatch, lens_for

    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_tokens=R,
                       key_axis=axis)
    batch = DecodeBatch(cfg, lens_for(cfg), D=D, rep=rep, dtype=dtype, block_size=max(32, G),
                        seed=G + rep)
    B, Hq, L = len(batch.lens), batch.query.shape[1], max(batch.lens) + 5
    kw = {"warp_tiles": wt} if wt else {}
    probs = torch.full((B, Hq, L), 7.0, device=DEVICE)
    out = batch.triton(num_splits=3, probs=probs, device=DEVICE, **kw)
    logits = torch.full((B, Hq, L), 7.0, device=DEVICE)
    lse = torch.empty(B, Hq, device=DEVICE)
    out2 = batch.triton(num_splits=3, probs=logits, probs_lse=lse, device=DEVICE, **kw)
    assert torch.equal(out, out2)
    for i, n in enumerate(batch.lens):
        torch.testing.assert_close(torch.exp2(logits[i, :, :n] - lse[i, :, None]),
                                   probs[i, :, :n], atol=0, rtol=1e-6)
        assert (logits[i, :, n:] == 7.0).all()


@pytest.mark.parametrize("method", ["h2o", "a2sf"])
def test_decode_scores_are_the_reference_step_scores(method):
    """``add_decode_scores`` (device ops, one batch) leaves every score slot
    as ``h2o_ref.add_step_scores`` (per request) does, with evicted ranges,
    block-table entries past a request's pages and freed pages pointing at
    other requests' pages (which must stay untouched)."""
    from vllm_kvcomp.kernels.eviction_gpu import add_decode_scores
    from vllm_kvcomp.kernels.h2o_ref import add_step_scores, score_view
    from vllm_kvcomp.layout import PageLayout

    ev = {"method": method, "budget_tokens": 48, "recent_tokens": 16}
    if method == "a2sf":
        ev["alpha"] = 0.7
    cfg = KvcompConfig.from_dict({"k_bits": 4, "v_bits": 4, "group_size": 16,
                                  "residual_tokens": 16, "eviction": ev})
    bs, rep = 16, 4
    layout = PageLayout(cfg, bs, D, 4)
    lens, prompts = [1, 37, 150, 201, 96], [1, 30, 100, 60, 97]
    B, W = len(lens), 14
    g = torch.Generator().manual_seed(3)
    table = torch.randperm(B * W, generator=g).view(B, W).int() + 1
    table[2, 3:5] = table[3, 0]  # freed pages now another request's
    cache = torch.randint(0, 255, (B * W + 1, H, layout.head_page_bytes), dtype=torch.uint8,
                          generator=g)
    score_view(cache, layout).copy_(torch.rand(B * W + 1, H, bs, generator=g))
    seq = torch.tensor(lens, dtype=torch.int32)
    ranges = evicted_ranges(cfg, bs, seq, torch.ones(B, dtype=torch.int32),
                            torch.tensor(prompts, dtype=torch.int32))
    assert (ranges[:, 1] > ranges[:, 0]).sum() >= 2
    L = max(lens) + 3
    probs = torch.zeros(B, H * rep, L)
    want = cache.clone()
    for i, n in enumerate(lens):
        lo, hi = ranges[i].tolist()
        pos = torch.cat([torch.arange(0, lo), torch.arange(hi, n)])
        p = torch.softmax(torch.randn(H, rep, 1, len(pos), generator=g), dim=-1)
        probs[i][:, :len(pos)] = p.view(H * rep, -1)  # in the order read
        add_step_scores(want, layout, cfg, table[i], n - 1, prompts[i], p, pos)
    got = cache.clone()
    add_decode_scores(probs, got, layout, cfg, table, seq, ranges)
    torch.testing.assert_close(score_view(got, layout), score_view(want, layout),
                               atol=1e-6, rtol=1e-6)
    assert not torch.equal(score_view(got, layout), score_view(cache, layout))
    # nothing but the score slots changes
    off = layout.scores_offset
    got[:, :, off: off + 4 * bs] = want[:, :, off: off + 4 * bs] = 0
    assert torch.equal(got, want)


# ---------------------------------------------- the backend's Triton steps

def _impl(cfg):
    """The backend's layer implementation without vLLM's layer around it."""
    from vllm_kvcomp.backend import KvcompImpl

    impl = KvcompImpl.__new__(KvcompImpl)
    impl.config, impl.head_size, impl.scale = cfg, D, D ** -0.5
    impl.num_heads, impl.num_kv_heads = H * REP, H
    impl._flash_attn = impl._decode_launch = impl.head_split = None
    return impl


def _metadata(sim, batch, prompt_lens, rows_config=None, graph=False):
    """The step's metadata as the backend's builder makes it; ``rows_config``:
    with the rows whose host work matters (``KVCOMP_EVICTION_ROWS``);
    ``graph``: a step whose every row decodes past its prompt taken as a
    captured one (``KVCOMP_EVICTION_GRAPHS``)."""
    from vllm_kvcomp.backend import KvcompMetadata
    from vllm_kvcomp.kernels.eviction_gpu import host_rows

    qsl, lens = batch.query_start_loc, batch.seq_lens
    q_lens = [b - a for a, b in zip(qsl, qsl[1:])]
    nd = next((i for i, x in enumerate(q_lens) if x > 1), len(q_lens))
    i32 = dict(dtype=torch.int32, device=DEVICE)
    md = KvcompMetadata(
        num_actual_tokens=qsl[-1], num_reqs=len(lens), query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(lens, **i32), block_table=sim.block_table.to(DEVICE),
        slot_mapping=None,
        block_size=sim.bs, max_query_len=max(q_lens), max_seq_len=max(lens), num_decodes=nd,
        query_start_loc_cpu=qsl, seq_lens_cpu=lens, prompt_lens_cpu=prompt_lens,
        prompt_lens=torch.tensor(prompt_lens, **i32))
    if rows_config is not None:
        md.eviction_rows = host_rows(rows_config, sim.bs, md)
        md.eviction_shared = {}
    md.graph_decode = graph and max(q_lens) == 1 and all(
        n > p for n, p in zip(lens, prompt_lens))
    res = None
    if sim.residual is not None:
        res = KvcompMetadata(
            num_actual_tokens=qsl[-1], num_reqs=len(lens), query_start_loc=md.query_start_loc,
            seq_lens=md.seq_lens, block_table=batch.residual_block_table.to(DEVICE),
            slot_mapping=batch.residual_slot_mapping.to(DEVICE), block_size=sim.bs_r,
            max_query_len=md.max_query_len, max_seq_len=md.max_seq_len)
    return md, res


def _freed(cfg, bs, c, P):
    """Pages the block manager has given back once ``c`` tokens are cached."""
    if cfg.eviction is None:
        return 0, 0
    policy = cfg.eviction.policy(bs)
    if cfg.eviction.method == "streamingllm":
        return policy.dropped_pages(c, cfg.quantized_prefix_len(c))
    if cfg.eviction.method in SCORED_EVICTION:
        return policy.freed_pages(c, cfg.quantized_prefix_len(c), P)
    if c < P:
        return 0, 0
    return policy.freed_pages(P, cfg.quantized_prefix_len(P))


def _run(cfg, prompts, schedule, q, k, v, bs, triton, head_split=None, quest=None,
         by_rows=False, rows_seen=None, graph=False):
    """Requests (prompt lengths ``prompts``, token rows one after another in
    q/k/v) through the steps of ``schedule`` (per step, each request's new
    tokens, one-token steps first as vLLM orders them), by the reference or
    by the backend's Triton path; freed pages point at a page of NaNs.
    ``head_split``: (retrieval, streaming) KV heads of a split layer, whose
    packed pages hold the retrieval heads and whose streaming heads' pages
    are all held (sinks and window stay where they were written). ``quest``:
    the layer's Quest page selection (``policies.quest.Quest``). ``by_rows``: the
    Triton path with the step's eviction rows (``host_rows``), each step's
    appended to ``rows_seen``; ``graph``: its decode steps past the prompts
    as captured steps (``_metadata``)."""
    from vllm_kvcomp.kernels.head_split_ref import split_step_reference

    R = len(prompts)
    totals = [sum(s[i] for s in schedule) for i in range(R)]
    base = [sum(totals[:i]) for i in range(R)]
    heads = len(head_split[0]) if head_split else k.shape[1]
    sim = SimPagedCache(cfg, bs, heads, D, R, max(totals), seed=1)
    sim.packed[0].fill_(0xFF)
    stream = SimPagedCache(
        KvcompConfig(k_bits=16, v_bits=16, residual_tokens=max(totals)), bs,
        len(head_split[1]), D, R, max(totals), seed=2) if head_split else None
    if triton:  # the caches the kernels read and write on DEVICE; block tables stay here
        sim.packed = sim.packed.to(DEVICE)
        sim.residual = None if sim.residual is None else sim.residual.to(DEVICE)
        if stream is not None:
            stream.residual = stream.residual.to(DEVICE)
    out = torch.zeros_like(q)
    done = [0] * R
    for step in schedule:
        for i in range(R):
            lo, hi = _freed(cfg, bs, done[i], prompts[i])
            sim.block_table[i, lo:max(lo, hi)] = 0
        ends = [c + s for c, s in zip(done, step)]
        batch = sim.batch(done, ends)
        batch.prompt_lens = list(prompts)
        sb = stream.batch(done, ends) if head_split else None
        rows = torch.cat([torch.arange(base[i] + done[i], base[i] + ends[i]) for i in range(R)])
        o = torch.zeros(len(rows), q.shape[1], D, device=DEVICE if triton else "cpu")
        if triton:
            qr, kr, vr = (x[rows].to(DEVICE) for x in (q, k, v))
            md, res = _metadata(sim, batch, list(prompts), cfg if by_rows else None, graph)
            if rows_seen is not None:
                rows_seen.append(md.eviction_rows)
            impl = _impl(cfg)
            if head_split:
                from dataclasses import replace

                impl.head_split = head_split
                smd = replace(md, block_table=sb.residual_block_table.to(DEVICE),
                              slot_mapping=sb.residual_slot_mapping.to(DEVICE),
                              block_size=sb.residual_block_size)
                impl._forward_triton_split(qr, kr, vr, o, sim.packed,
                                           sim.residual, md, res, sim.layout, quest,
                                           stream.residual, smd)
            else:
                impl._forward_triton(qr, kr, vr, o, sim.packed, sim.residual,
                                     md, res, sim.layout, quest)
        elif head_split:
            split_step_reference(q[rows], k[rows], v[rows], o, sim.packed, sim.residual,
                                 sim.layout, cfg, D ** -0.5, batch, head_split, stream.residual,
                                 sb.residual_block_table, sb.residual_slot_mapping,
                                 sb.residual_block_size, quest=quest)
        else:
            kvcomp_step_reference(q[rows], k[rows], v[rows], o, sim.packed, sim.residual,
                                  sim.layout, cfg, D ** -0.5, batch, quest=quest)
        out[rows] = o.cpu()
        done = ends
    return out


def _inputs(total, prompts, window, seed):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(total, h, D, generator=g) for h in (H * REP, H, H))
    return q, k, v


SNAP = {"method": "snapkv", "window": 8}
STEP_CASES = [
    # two prompts in one batch: chunks, a decode beside a prefill, decodes
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16,
      "eviction": {**SNAP, "budget_tokens": 40}}, 16, [100, 190],
     [[64, 100], [36, 84], [1, 6]] + [[1, 1]] * 10),
    # the prompt's last chunk one token long: a decode-kernel step selects
    ({"k_bits": 4, "v_bits": 2, "key_axis": "token", "group_size": 16, "residual_tokens": 8,
      "eviction": {**SNAP, "budget_tokens": 52}}, 16, [70, 190],
     [[64, 100], [6, 89], [1, 1]] + [[1, 1]] * 10),
    # generated tokens in the completing step (recompute after preemption)
    ({"k_bits": 8, "v_bits": 4, "key_axis": "token", "group_size": 16, "residual_tokens": 8,
      "eviction": {**SNAP, "budget_tokens": 70}}, 16, [190], [[100], [110]] + [[1]] * 8),
    # per-channel keys regrouped, 32-token pages, prompts as stored
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16,
      "prompt_attention": "as_stored", "eviction": {**SNAP, "budget_ratio": 0.4}}, 32,
     [251], [[120], [131]] + [[1]] * 12),
    # 16 bits, prompts in full precision
    ({"k_bits": 16, "v_bits": 16, "residual_tokens": 16, "prompt_attention": "full_precision",
      "eviction": {**SNAP, "budget_tokens": 100}}, 16, [230], [[230]] + [[1]] * 12),
    # StreamingLLM: the dropped range grows inside prefill chunks and decodes
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16,
      "eviction": {"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 24}}, 16,
     [150, 90], [[64, 40], [64, 50], [1, 22]] + [[1, 1]] * 40),
    ({"k_bits": 2, "v_bits": 2, "key_axis": "token", "group_size": 16, "residual_tokens": 8,
      "prompt_attention": "full_precision",
      "eviction": {"method": "streamingllm", "sink_tokens": 20, "recent_tokens": 40}}, 16,
     [200], [[128], [72]] + [[1]] * 30),
    # H2O: scores from the decode kernel and (prefill rows) the reference, a
    # decode beside a prompt's last chunk, eviction steps at the prompts' ends
    # and every page of decodes after them; short prompts and long decodes, so
    # the decode steps' scores decide what stays
    ({"k_bits": 4, "v_bits": 4, "group_size": 16, "residual_tokens": 16,
      "eviction": {"method": "h2o", "budget_tokens": 48, "recent_tokens": 16}}, 16, [40, 60],
     [[40, 30], [1, 30]] + [[1, 1]] * 70),
    # A2SF: the prompt in one step, a 32-token page, prompts as stored
    ({"k_bits": 4, "v_bits": 2, "key_axis": "token", "group_size": 16, "residual_tokens": 8,
      "prompt_attention": "as_stored",
      "eviction": {"method": "a2sf", "budget_tokens": 72, "recent_tokens": 24, "alpha": 0.6}},
     32, [150], [[150]] + [[1]] * 70),
    # A2SF, per-channel keys regrouped, a recomputed request (generated tokens
    # in the prefill that completes its prompt)
    ({"k_bits": 2, "v_bits": 2, "group_size": 16, "residual_tokens": 16,
      "eviction": {"method": "a2sf", "budget_tokens": 56, "recent_tokens": 16, "alpha": 0.3}},
     16, [120], [[64], [80]] + [[1]] * 36),
]


@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", STEP_CASES)
def test_triton_steps_match_the_reference_steps(kvcomp, bs, prompts, schedule):
    """Every query's output on the Triton path equals the reference path's
    (float32 summation order apart) with pages freed under it, and the
    eviction changed what later queries read."""
    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    ref = _run(cfg, prompts, schedule, q, k, v, bs, triton=False)
    tri = _run(cfg, prompts, schedule, q, k, v, bs, triton=True)
    assert torch.isfinite(ref).all() and torch.isfinite(tri).all()
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)
    plain = KvcompConfig.from_dict({x: y for x, y in kvcomp.items() if x != "eviction"})
    full = _run(plain, prompts, schedule, q, k, v, bs, triton=False)
    assert (full - ref).abs().max() > 1e-2

SCORED_CASES = [c for c in STEP_CASES if c[0]["eviction"]["method"] in SCORED_EVICTION]


# SnapKV's chunks with a decode beside a prefill, and H2O's decode-kernel scores and page
# steps (A2SF's rows are H2O's: the same layouts)
ROWS_CASES = [STEP_CASES[0], next(c for c in STEP_CASES if c[0]["eviction"]["method"] == "h2o")]


@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", ROWS_CASES)
def test_host_work_on_the_eviction_rows_alone_gives_the_same_steps(kvcomp, bs, prompts,
                                                                    schedule):
    """With the rows whose host work matters computed once a step
    (``host_rows``, KVCOMP_EVICTION_ROWS) and the ranges and read width
    shared across layers, the Triton path's every output is bit for bit the
    path that walks every request; most steps' rows are a few of the batch
    (none at all once every request decodes between evictions)."""
    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    every = _run(cfg, prompts, schedule, q, k, v, bs, triton=True)
    seen = []
    some = _run(cfg, prompts, schedule, q, k, v, bs, triton=True, by_rows=True,
                rows_seen=seen)
    assert torch.equal(some, every)
    assert any(seen) and sum(map(len, seen)) < sum(map(len, schedule)) / 2
    assert any(not r for r in seen)


# A2SF's recomputed request: ages counted over a whole step met in pieces (H2O is alpha 1)
@pytest.mark.parametrize("kvcomp,bs,prompts,schedule", SCORED_CASES[-1:])
def test_prefill_scores_in_pieces_give_the_reference_steps(monkeypatch, kvcomp, bs, prompts,
                                                           schedule):
    """H2O / A2SF score a prefill chunk's queries a few at a time where the
    whole chunk's probabilities would not fit (``SCORE_PIECE_BYTES``; here
    small enough for pieces of a few rows): the Triton steps still equal the
    reference steps, A2SF's ages counted from the whole step."""
    from vllm_kvcomp.kernels import eviction_gpu

    assert eviction_gpu.score_row_pieces(10, 4, 100, piece_bytes=4 * 4 * 100 * 3) == [
        (0, 3), (3, 6), (6, 9), (9, 10)]
    monkeypatch.setattr(eviction_gpu, "SCORE_PIECE_BYTES", 4 * H * REP * 200 * 5)
    cfg = KvcompConfig.from_dict(kvcomp)
    total = sum(map(sum, schedule))
    q, k, v = _inputs(total, prompts, 8, seed=len(schedule))
    ref = _run(cfg, prompts, schedule, q, k, v, bs, triton=False)
    tri = _run(cfg, prompts, schedule, q, k, v, bs, triton=True)
    torch.testing.assert_close(tri, ref, atol=1e-5, rtol=1e-5)



@pytest.mark.parametrize("method", ["snapkv", "h2o"])
def test_dummy_steps_without_prompt_lengths_evict_nothing(method):
    """vLLM's GPU model runner builds its warm-up, profiling and CUDA-graph
    capture batches without prompt lengths: the Triton path serves them as
    steps of requests still in their prompts (nothing evicted: the same
    output and stored K/V), rather than failing the engine's start."""
    cfg = KvcompConfig.from_dict({"k_bits": 4, "v_bits": 4, "group_size": 16,
                                  "residual_tokens": 16,
                                  "eviction": {"method": method, "budget_tokens": 32}})
    bs, done, ends = 16, [150, 0], [151, 70]
    sim = SimPagedCache(cfg, bs, H, D, len(done), max(ends), seed=3)
    batch = sim.batch(done, ends)
    q, k, v = _inputs(sum(e - d for d, e in zip(done, ends)), None, 0, seed=5)
    outs = []
    for prompt_lens in (None, [e + 1000 for e in ends]):
        md, res = _metadata(sim, batch, prompt_lens or [1] * len(done))
        if prompt_lens is None:
            md.prompt_lens = md.prompt_lens_cpu = None
        packed = sim.packed.clone().to(DEVICE)
        residual = sim.residual.clone().to(DEVICE) if sim.residual is not None else None
        o = torch.zeros(q.shape[0], H * REP, D, device=DEVICE)
        _impl(cfg)._forward_triton(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), o, packed,
                                   residual, md, res, sim.layout)
        outs.append((o.cpu(), packed.cpu()))
    (o_dummy, packed_dummy), (o_running, packed_running) = outs
    assert torch.isfinite(o_dummy).all()
    torch.testing.assert_close(o_dummy, o_running, atol=0, rtol=0)
    if method in SCORED_EVICTION:  # a running prompt's rows score; dummy rows do not
        off = sim.layout.scores_offset
        assert torch.equal(packed_dummy[:, :, off:], sim.packed[:, :, off:])
        packed_dummy[:, :, off:] = packed_running[:, :, off:] = 0
    assert torch.equal(packed_dummy, packed_running)


# ---------------------------------------------------------------- start-up

def test_gpu_serves_every_eviction_method(monkeypatch):
    """Each method's engine has served on a GPU: a GPU start-up takes all
    four without KVCOMP_EVICTION_GPU (a method that has not run there is
    refused unless asked: test_h2o)."""
    from vllm_kvcomp.validation import GPU_EVICTION, GPU_RUN_EVICTION, check_eviction_platform

    assert GPU_RUN_EVICTION == GPU_EVICTION
    monkeypatch.delenv("KVCOMP_EVICTION_GPU", raising=False)
    for ev in ({"method": "snapkv", "budget_tokens": 64}, {"method": "streamingllm"},
               {"method": "h2o", "budget_tokens": 64}, {"method": "a2sf", "budget_tokens": 64}):
        check_eviction_platform(KvcompConfig.from_dict({"eviction": ev}), on_cpu=False)


# -------------------------------------------------------------- end to end

def test_engine_snapkv_triton_path_matches_reference_path(tiny_llama):
    """The engine on the Triton path (interpreter, KVCOMP_EVICTION_GPU=1)
    with SnapKV gives the reference path's tokens over chunked prefill,
    prefix hits and decode, pages freed under it; a budget covering every
    prompt gives the tokens of no eviction. Prompts attend in full precision,
    where the two paths are token-identical without eviction too
    (test_e2e_triton_path.py)."""
    from e2e_util import run_engines, token_prompts

    base = {"k_bits": 4, "v_bits": 4, "group_size": 32, "residual_tokens": 32,
            "block_size": 32, "prompt_attention": "full_precision"}
    snap = {**base, "eviction": {"method": "snapkv", "budget_tokens": 96, "window": 16}}
    wide = {**base, "eviction": {"method": "snapkv", "budget_tokens": 2048, "window": 16}}
    triton = {"KVCOMP_FORCE_TRITON": "1", "TRITON_INTERPRET": "1", "KVCOMP_EVICTION_GPU": "1"}

    # five decode steps over the pages SnapKV kept: each interpreted step costs
    # seconds, and the long prompts' tokens differ from the second on
    def run(kvcomp, env=None):
        spec = dict(model=tiny_llama, backend="kvcomp", kvcomp=kvcomp,
                    engine=dict(max_model_len=1024, max_num_batched_tokens=128, max_num_seqs=4,
                                enable_chunked_prefill=True, enable_prefix_caching=True),
                    prompts=token_prompts([400, 250, 40], seed=5), max_tokens=6)
        return dict(spec=spec, env=env) if env else dict(spec=spec)

    ref, plain, tri, tri_wide = run_engines(run(snap), run(base), run(snap, triton),
                                            run(wide, triton))
    assert tri["tokens"] == ref["tokens"]
    assert tri_wide["tokens"] == plain["tokens"]
    assert ref["tokens"][:2] != plain["tokens"][:2]  # the long prompts lost tokens


@pytest.mark.parametrize("env", [None, "1", "0"])
def test_builder_gives_the_eviction_rows_unless_told_not_to(monkeypatch, env):
    """The GPU builder's metadata for an H2O step carries its eviction rows
    (the one request whose layout moves) and a fresh per-step share, unless
    KVCOMP_EVICTION_ROWS=0 has every layer walk every request."""
    from types import SimpleNamespace

    from vllm_kvcomp.backend import KvcompMetadataBuilder
    from vllm_kvcomp.kernels.eviction_gpu import eviction_rows_config
    from vllm_kvcomp.launch_env import EVICTION_ROWS_ENV

    if env is None:
        monkeypatch.delenv(EVICTION_ROWS_ENV, raising=False)
    else:
        monkeypatch.setenv(EVICTION_ROWS_ENV, env)
    opt_in = env != "0"
    cfg = KvcompConfig.from_dict({"k_bits": 4, "v_bits": 4, "group_size": 16,
                                  "residual_tokens": 16, "eviction": {
                                      "method": "h2o", "budget_tokens": 48,
                                      "recent_tokens": 16}})
    policy = cfg.eviction.policy(16)
    # decodes from lengths 100 .. 139 for prompts of 40: the steps whose layout moves
    moving = [n for n in range(100, 140) if policy.layout(n - 1, cfg.quantized_prefix_len(n - 1),
                                                          40) != policy.layout(
        n, cfg.quantized_prefix_len(n), 40)]
    assert moving
    lens = [moving[0], moving[0] + 1, moving[0] + 2]
    builder = KvcompMetadataBuilder.__new__(KvcompMetadataBuilder)
    builder.kv_cache_spec = SimpleNamespace(block_size=16)
    builder.on_cpu, builder.host_lists = False, True
    builder.rows_config = eviction_rows_config(cfg)
    builder.prompt_lens_buffer = None
    assert eviction_rows_config(KvcompConfig.from_dict(
        {"eviction": {"method": "streamingllm", "sink_tokens": 4, "recent_tokens": 24}})) is None
    i32 = dict(dtype=torch.int32)
    cam = SimpleNamespace(
        num_reqs=3, num_actual_tokens=3, max_query_len=1, max_seq_len=max(lens),
        query_start_loc=torch.arange(4, **i32), query_start_loc_cpu=torch.arange(4, **i32),
        seq_lens=torch.tensor(lens, **i32), seq_lens_cpu=torch.tensor(lens, **i32),
        block_table_tensor=torch.zeros(3, 16, **i32), slot_mapping=torch.zeros(3, **i32),
        rswa_prefix_lens=torch.tensor([40] * 3, **i32))
    md = builder.build(0, cam)
    assert md.prompt_lens_cpu == [40] * 3
    if opt_in:
        assert md.eviction_rows == [0] and md.eviction_shared == {}
    else:
        assert md.eviction_rows is None and md.eviction_shared is None


@pytest.mark.parametrize("method", sorted(SCORED_EVICTION))
def test_evict_step_candidates_on_the_device_are_the_host_ones(method):
    """``h2o_ref.evict_step(on_device=True)`` (KVCOMP_EVICTION_ROWS) compacts
    the same kept tokens at the same steps as the candidates made on the
    host, over every step of prompts short and long, decodes included."""
    from vllm_kvcomp.kernels import h2o_ref
    from vllm_kvcomp.layout import PageLayout

    cfg = KvcompConfig.from_dict({"k_bits": 4, "v_bits": 4, "group_size": 16,
                                  "residual_tokens": 16, "eviction": {
                                      "method": method, "budget_tokens": 48,
                                      "recent_tokens": 16}})
    bs = 16
    layout = PageLayout(cfg, bs, D, 2)
    g = torch.Generator().manual_seed(0)
    cache = torch.randint(0, 256, (40, H, layout.head_page_bytes), dtype=torch.uint8,
                          generator=g)
    row = torch.randperm(40, generator=g)[:30]
    calls = {True: [], False: []}
    for P in (20, 50, 130):
        for start in range(P - 3, 400):
            for t in (1, 7):
                for on_device in (True, False):
                    h2o_ref.evict_step(cache, layout, cfg, row, start, start + t, P,
                                       torch.bfloat16, on_device=on_device,
                                       compact=lambda *a, od=on_device: calls[od].append(
                                           a[3].clone()))
    assert len(calls[True]) == len(calls[False]) > 10
    assert all(torch.equal(a, b) for a, b in zip(calls[True], calls[False]))
