"""Quest (query-aware page selection at decode): the settings, the rule against
a float reference, the PyTorch reference attention, the Triton scoring /
selection and sparse decode kernels against their references (under
``TRITON_INTERPRET=1`` when there is no GPU), the engine end to end on the CPU,
and the GPU start-up refusal.

Tolerances: the Triton sparse decode against its reference as the decode
kernel's (``decode_batch.TOL``: 2e-3 float32, 2e-2 bf16); the reference against
a float attention over exactly the selected pages 2e-5. Selections are compared
exactly (page sets per KV head).
"""
from __future__ import annotations

import random

import pytest
import torch

import vllm_kvcomp
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.kernels import attention_ref, packing
from vllm_kvcomp.kernels.decode_batch import TOL, DecodeBatch
from vllm_kvcomp.policies.quest import Quest

vllm_kvcomp.register()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


def _batch(cfg, lens, rep, bs, seed, dtype=torch.float32, D=64):
    b = DecodeBatch(cfg, lens, H=2, D=D, rep=rep, dtype=dtype, block_size=bs, seed=seed)
    # keys without DecodeBatch's shared outlier channels, so that KV heads and
    # queries disagree on their pages (the outliers make every head pick alike)
    g = torch.Generator().manual_seed(seed + 5)
    b.query = (2 * torch.randn(b.query.shape, generator=g)).to(dtype)
    return b


def _float_selection(b: DecodeBatch, quest: Quest) -> list[list[set[int]]]:
    """Selected pages per request and KV head, from float64 bounds over the
    dequantized keys of each key group (min / max per channel), largest over a
    page's groups and the head's query heads; ties to the lower page."""
    cfg, bs, G = b.cfg, b.layout.block_size, b.cfg.group_size
    out = []
    for i, n in enumerate(b.lens):
        q_old = cfg.quantized_prefix_len(max(n - 1, 0))
        P = -(-q_old // bs)
        H = b.packed.shape[1]
        if n <= 0 or P == 0:
            out.append([set() for _ in range(H)])
            continue
        k, _ = packing.dequantize_pages(b.packed, b.layout, b.block_table[i, :P].long(),
                                        torch.float32)
        k = k.double().view(P, bs // G, G, H, -1)
        lo, hi = k.amin(2), k.amax(2)  # P, groups, H, D
        q = b.query[i].double().view(H, -1, k.shape[-1])  # H, rep, D
        heads = []
        for h in range(H):
            score = [max(float(torch.maximum(q[h, r] * hi[p, g, h], q[h, r] * lo[p, g, h]).sum())
                         for g in range(bs // G) for r in range(q.shape[1])) for p in range(P)]
            if P <= quest.budget_pages:
                heads.append(set(range(P)))
            else:
                ranked = sorted(range(P - 1), key=lambda p: (-score[p], p))
                heads.append(set(ranked[: quest.budget_pages - 1]) | {P - 1})
        out.append(heads)
    return out


def _as_sets(sel: torch.Tensor) -> list[list[set[int]]]:
    return [[{int(p) for p in row if p >= 0} for row in req] for req in sel.cpu()]


CASES = [
    # (kvcomp settings, block size, budget tokens)
    (dict(k_bits=4, v_bits=4, group_size=16, residual_tokens=8), 32, 64),
    (dict(k_bits=2, v_bits=2, group_size=32, residual_tokens=16), 32, 96),
    (dict(k_bits=8, v_bits=4, group_size=16, residual_tokens=0), 16, 48),
    (dict(k_bits=4, v_bits=2, group_size=16, residual_tokens=8, value_group_size=16), 64, 128),
    (dict(k_bits=4, v_bits=16, group_size=32, residual_tokens=8), 32, 32),
]


@pytest.mark.parametrize("rep", [1, 4, 8])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_selection_matches_float_reference(case, rep):
    """Reference and Triton selections equal the float reference's, on
    contexts that are not multiples of the block size (some within the budget,
    one with only the window)."""
    from vllm_kvcomp.kernels.triton_quest import quest_select, quest_select_reference

    kv, bs, budget = CASES[case]
    cfg = KvcompConfig(**kv)
    rng = random.Random(case * 10 + rep)
    lens = [1, 5, budget + 3] + [rng.randrange(bs * 3, bs * 14) for _ in range(4)]
    b = _batch(cfg, lens, rep, bs, seed=case * 10 + rep)
    quest = Quest(budget, bs)
    want = _float_selection(b, quest)
    ref = quest_select_reference(b.query, b.packed, b.block_table, b.seq_lens, b.layout, cfg,
                                 quest)
    assert _as_sets(ref) == want
    args = [t.to(DEVICE) for t in (b.query, b.packed, b.block_table, b.seq_lens)]
    got = quest_select(*args, b.layout, cfg, quest)
    assert _as_sets(got) == want
    # the pages are not the same for every head and request (else this tests little)
    assert len({frozenset(s) for req in want for s in req if len(s) >= quest.budget_pages}) > 2


@pytest.mark.parametrize("launch", [dict(split_heads=True), dict(block_p=2, num_warps=1),
                                    dict(block_p=32, split_heads=True, num_warps=8)])
def test_scoring_launch_choices_select_alike(launch):
    """The scoring launch's tile, query-head loop and warps change how the
    bounds are summed, not which pages are selected (float reference)."""
    from vllm_kvcomp.kernels.triton_quest import (quest_page_scores, quest_select,
                                                  quest_top_pages)

    kv, bs, budget = CASES[0]
    cfg = KvcompConfig(**kv)
    b = _batch(cfg, [5, budget + 3, 7 * bs + 3, 13 * bs + 5], 4, bs, seed=21)
    quest = Quest(budget, bs)
    args = [t.to(DEVICE) for t in (b.query, b.packed, b.block_table, b.seq_lens)]
    base = quest_page_scores(*args, b.layout, cfg, quest)
    scores = quest_page_scores(*args, b.layout, cfg, quest, **launch)
    torch.testing.assert_close(scores, base, rtol=1e-5, atol=1e-5)
    got = quest_top_pages(scores, args[3], b.layout, cfg, quest, num_warps=2)
    assert _as_sets(got) == _float_selection(b, quest)
    assert _as_sets(got) == _as_sets(quest_select(*args, b.layout, cfg, quest))


def test_score_bounds_every_stored_key():
    """A page's score is at least every q.k over its stored (dequantized) keys,
    for every query head of the KV head."""
    cfg = KvcompConfig(k_bits=2, v_bits=2, group_size=16, residual_tokens=8)
    b = _batch(cfg, [300], 4, 32, seed=3)
    q_old = cfg.quantized_prefix_len(299)
    P = -(-q_old // 32)
    ids = b.block_table[0, :P].long()
    lo, hi = packing.key_group_ranges(b.packed, b.layout, ids)
    scores = Quest.page_scores(b.query[0], lo, hi)  # H, P
    k, _ = packing.dequantize_pages(b.packed, b.layout, ids, torch.float32)
    qk = torch.einsum("hrd,khd->hrk", b.query[0].view(2, 4, -1), k.view(P * 32, 2, -1))
    worst = qk.view(2, 4, P, 32).amax(dim=(1, 3))
    assert (scores >= worst - 1e-4).all()
    # and it is a bound, not the value
    assert (scores > worst + 1e-3).any()


def _selected_float_attention(b: DecodeBatch, quest: Quest, i: int) -> torch.Tensor:
    """Float attention of request i's query heads over the dequantized keys of
    the pages its KV head selected, then the full-precision window and the
    fresh token."""
    cfg, bs = b.cfg, b.layout.block_size
    n = b.lens[i]
    q_old = cfg.quantized_prefix_len(n - 1)
    sel = _float_selection(b, quest)[i]
    k_all, v_all = packing.dequantize_pages(b.packed, b.layout, b.block_table[i].long(),
                                            torch.float32)
    H, D = b.packed.shape[1], b.layout.head_size
    q = b.query[i].float().view(H, -1, D)
    out = torch.zeros(q.shape)
    for h in range(H):
        idx = [p * bs + t for p in sorted(sel[h]) for t in range(bs) if p * bs + t < q_old]
        kk = torch.cat([k_all[idx, h], b.K[i][q_old:, h].float()])
        vv = torch.cat([v_all[idx, h], b.V[i][q_old:, h].float()])
        probs = torch.softmax(q[h] @ kk.T * b.scale, -1)
        out[h] = probs @ vv
    return out.reshape(-1, D)


def test_reference_attends_exactly_the_selected_pages():
    from vllm_kvcomp.kernels.triton_decode import decode_attention_reference
    from vllm_kvcomp.kernels.triton_quest import quest_decode_reference

    kv, bs, budget = CASES[0]
    cfg = KvcompConfig(**kv)
    b = _batch(cfg, [1, 30, 211, 390], 4, bs, seed=9)
    quest = Quest(budget, bs)
    out = quest_decode_reference(*b.args(), quest)
    for i in range(len(b.lens)):
        torch.testing.assert_close(out[i], _selected_float_attention(b, quest, i),
                                   atol=2e-5, rtol=2e-5)
    dense = decode_attention_reference(*b.args())
    assert (out[2:] - dense[2:]).abs().max() > 1e-2  # sparse where past the budget
    assert torch.equal(out[:2], dense[:2])  # dense within it


@pytest.mark.parametrize("case", range(len(CASES)))
def test_budget_covering_the_context_is_dense_decode(case):
    """With budget_tokens >= context the reference is dense decode bit for
    bit, and the Triton sparse decode over its (all-page) selection agrees
    with it."""
    from vllm_kvcomp.kernels.triton_decode import decode_attention_reference
    from vllm_kvcomp.kernels.triton_quest import quest_decode_attention, quest_select

    kv, bs, _ = CASES[case]
    cfg = KvcompConfig(**kv)
    lens = [1, 17, 3 * bs + 5, 7 * bs + 1]
    b = _batch(cfg, lens, 4, bs, seed=case)
    quest = Quest(-(-max(lens) // bs) * bs, bs)
    dense = decode_attention_reference(*b.args())
    from vllm_kvcomp.kernels.triton_quest import quest_decode_reference

    assert torch.equal(quest_decode_reference(*b.args(), quest), dense)
    args = b.args(DEVICE)
    sel = quest_select(args[0], args[3], args[5], args[7], b.layout, cfg, quest)
    out = quest_decode_attention(*args[:8], sel, *args[8:], quest).cpu()
    torch.testing.assert_close(out, dense, atol=TOL[torch.float32], rtol=TOL[torch.float32])


@pytest.mark.parametrize("rep,dtype,case", [
    (1, torch.float32, 0), (4, torch.float32, 1), (8, torch.float32, 2),
    (4, torch.float32, 3), (2, torch.float32, 4), (4, torch.bfloat16, 0),
    (8, torch.float16, 1)])
def test_sparse_decode_kernel_matches_reference(rep, dtype, case):
    """The Triton sparse decode over the Triton selection against the reference
    (its own selection), GQA 1-8, every value width, padding rows included."""
    from vllm_kvcomp.kernels.triton_quest import (
        quest_decode_attention,
        quest_decode_reference,
        quest_select,
    )

    kv, bs, budget = CASES[case]
    cfg = KvcompConfig(**kv)
    rng = random.Random(case + rep)
    lens = [0, 1, 9] + [rng.randrange(bs * 2, bs * 12) for _ in range(3)]
    b = _batch(cfg, lens, rep, bs, seed=case + 20, dtype=dtype)
    quest = Quest(budget, bs)
    ref = quest_decode_reference(*b.args(), quest)
    args = b.args(DEVICE)
    sel = quest_select(args[0], args[3], args[5], args[7], b.layout, cfg, quest)
    packed_before = args[3].clone()
    out = quest_decode_attention(*args[:8], sel, *args[8:], quest)
    assert torch.equal(args[3], packed_before)
    assert out.dtype == dtype
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().float(), ref.float(), atol=tol, rtol=tol)
    assert (out[0] == 0).all()


class _Grids:
    """A kernel that runs as before and records each launch's grid."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(tuple(grid))
        return self.kernel[grid]


@pytest.mark.parametrize("rep,case,splits", [
    (1, 0, 2), (4, 1, 3), (8, 2, 5), (4, 3, 1), (4, 4, 4), (8, 1, None), (1, 3, None)])
def test_sparse_decode_over_splits_matches_reference(rep, case, splits, monkeypatch):
    """Quest's attention with its selected pages shared out to ``splits``
    split-K programs (None: ``quest_num_splits``), the splits merged, against
    the reference: GQA 1-8, contexts off the block size, requests within the
    budget and past it. The decode kernel runs with that many splits, the
    merge exactly when there are several."""
    from vllm_kvcomp.kernels import triton_decode
    from vllm_kvcomp.kernels.decode_launch import DEFAULT_LAUNCH, decode_tiles_and_slices
    from vllm_kvcomp.kernels.triton_common import layout_constexprs
    from vllm_kvcomp.kernels.triton_quest import (
        quest_decode_attention,
        quest_decode_reference,
        quest_num_splits,
        quest_select,
    )

    kv, bs, budget = CASES[case]
    cfg = KvcompConfig(**kv)
    rng = random.Random(case * 7 + rep)
    lens = [0, 1, budget // 2 + 3, budget + bs + 5] + [rng.randrange(bs * 4, bs * 12)
                                                       for _ in range(2)]
    b = _batch(cfg, lens, rep, bs, seed=case * 7 + rep + 60)
    quest = Quest(budget, bs)
    ref = quest_decode_reference(*b.args(), quest)
    args = b.args(DEVICE)
    sel = quest_select(args[0], args[3], args[5], args[7], b.layout, cfg, quest)
    main = _Grids(triton_decode._kvcomp_decode_kernel)
    merge = _Grids(triton_decode._kvcomp_decode_merge_kernel)
    monkeypatch.setattr(triton_decode, "_kvcomp_decode_kernel", main)
    monkeypatch.setattr(triton_decode, "_kvcomp_decode_merge_kernel", merge)
    out = quest_decode_attention(*args[:8], sel, *args[8:], quest,
                                 **({} if splits is None else {"num_splits": splits}))
    tol = TOL[torch.float32]
    torch.testing.assert_close(out.cpu(), ref, atol=tol, rtol=tol)
    B, H = len(lens), b.packed.shape[1]
    if splits is None:
        bn = decode_tiles_and_slices(b.layout, layout_constexprs(b.layout),
                                     DEFAULT_LAUNCH["block_n"], DEFAULT_LAUNCH["warp_tiles"])[0]
        splits = quest_num_splits(B, H, quest, cfg, bn)
        assert splits > 1  # the rule's own choice is split-K here
    assert main.grids == [(B * H, 1, splits)]
    assert merge.grids == ([(B * H, rep)] if splits > 1 else [])
    # past the budget the pages read are fewer than the context's
    assert (out.cpu()[3:] - b.reference()[3:]).abs().max() > 1e-2


def test_measured_quest_shape_splits_as_measured_best():
    """At the shape Quest was measured at on an H200 (batch 32 x 32K, 8 KV
    heads, budget 2048 in pages of 128, k4v4, 128-token key groups and
    window) its attention launch takes the split count that ran fastest
    there, 2 (512 programs, not one per (request, KV head)), where the dense
    kernel takes 5; smaller batches get more."""
    from vllm_kvcomp.kernels.decode_launch import decode_num_splits
    from vllm_kvcomp.kernels.triton_quest import quest_num_splits

    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=128, residual_tokens=128)
    quest = Quest(2048, 128)
    assert quest_num_splits(32, 8, quest, cfg, 128) == 2
    assert quest_num_splits(4, 8, quest, cfg, 128) > 2
    assert decode_num_splits(32, 8, 32768, cfg, 128) == 5


@pytest.mark.parametrize("case,pad", [(0, False), (1, True), (2, False), (3, True)])
def test_rewrite_kernel_matches_reference(case, pad):
    """The rewritten batch Quest's attention runs on (block tables of the
    selected pages in ascending order, lengths, window rows), from one
    kernel, equals the PyTorch construction exactly: selections in any
    order with unused entries anywhere, padding rows, short requests, a
    window view padded like vLLM's."""
    from vllm_kvcomp.kernels.triton_quest import (
        _per_head_blocks,
        quest_rewrite,
        quest_rewrite_reference,
    )

    kv, bs, budget = CASES[case]
    cfg = KvcompConfig(**kv)
    rng = random.Random(case + 90)
    lens = [0, 1, 7, budget + 1] + [rng.randrange(bs * 3, bs * 14) for _ in range(3)]
    b = DecodeBatch(cfg, lens, H=2, D=64, rep=4, block_size=bs, seed=case,
                    pad_residual=pad)
    quest = Quest(budget, bs)
    KP, B, H = quest.budget_pages, len(lens), 2
    sel = torch.full((B, H, KP), -1, dtype=torch.int32)
    for i, n in enumerate(lens):
        pages = -(-cfg.quantized_prefix_len(max(n - 1, 0)) // bs)
        for h in range(H):
            pick = rng.sample(range(pages), min(pages, KP))
            slots = rng.sample(range(KP), len(pick))
            for p, j in zip(pick, slots):
                sel[i, h, j] = p
    args = b.args(DEVICE)
    heads = _per_head_blocks(args[3], 1)[1:]
    res_heads = _per_head_blocks(args[4], 2)[1:] if args[4] is not None else None
    rows = args[6] if args[4] is not None else None
    got = quest_rewrite(sel.to(DEVICE), args[5], args[7], rows, b.layout, cfg, quest, b.bs_r,
                        heads, res_heads)
    want = quest_rewrite_reference(sel, b.block_table, b.seq_lens,
                                   b.residual_table if rows is not None else None, b.layout,
                                   cfg, quest, b.bs_r, heads, res_heads)
    assert len(got) == len(want) == 3
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if w is not None:
            assert torch.equal(g.cpu(), w), (g, w)
    assert (got[1].cpu() < torch.tensor(lens).repeat_interleave(H)).any()  # pages dropped


def _backend_decode(b: DecodeBatch, quest) -> torch.Tensor:
    """One decode step of ``b`` through the backend's own Triton path (the
    GPU's launch code: store, then Quest's selection and sparse decode or the
    dense decode), on copies of its caches."""
    from unittest import mock

    from vllm_kvcomp import backend
    from vllm_kvcomp.backend import KvcompImpl, KvcompMetadata

    cfg, B = b.cfg, len(b.lens)
    H, D = b.key_new.shape[1:]
    Hq = b.query.shape[1]
    with mock.patch.object(backend, "current_config", lambda: cfg):
        impl = KvcompImpl(num_heads=Hq, head_size=D, scale=b.scale, num_kv_heads=H)
    impl._decode_launch = {}
    last = torch.tensor(b.lens) - 1
    qsl = torch.arange(B + 1, dtype=torch.int32, device=DEVICE)
    dev = lambda t: t.to(DEVICE)  # noqa: E731

    def md(table, bs, slots):
        return KvcompMetadata(num_actual_tokens=B, num_reqs=B, query_start_loc=qsl,
                              seq_lens=dev(b.seq_lens), block_table=dev(table),
                              slot_mapping=dev(slots),
                              block_size=bs, max_query_len=1, max_seq_len=max(b.lens),
                              num_decodes=B)
    rows = torch.arange(B)
    res_slots = (b.residual_table[rows, last // b.bs_r].long() * b.bs_r + last % b.bs_r)
    packed_slots = b.block_table[rows, last // b.layout.block_size].long() * \
        b.layout.block_size + last % b.layout.block_size
    out = torch.zeros_like(b.query, device=DEVICE)
    residual = dev(b.residual.clone()) if b.residual is not None else None
    impl._forward_triton(dev(b.query).reshape(B, -1), dev(b.key_new).reshape(B, -1),
                         dev(b.value_new).reshape(B, -1), out.view(B, -1),
                         dev(b.packed.clone()), residual,
                         md(b.block_table, b.layout.block_size, packed_slots),
                         md(b.residual_table, b.bs_r, res_slots) if residual is not None
                         else None, b.layout, quest)
    return out.cpu()


@pytest.mark.parametrize("case", [0, 1, 3])
def test_backend_decode_step_reads_the_selected_pages(case):
    """The backend's Triton decode step (the launch code a GPU runs, interpreted
    here) under Quest equals the Quest reference step, and differs from its
    dense step where a request is past the budget."""
    from vllm_kvcomp.kernels.triton_decode import decode_attention_reference
    from vllm_kvcomp.kernels.triton_quest import quest_decode_reference

    kv, bs, budget = CASES[case]
    cfg = KvcompConfig(**kv)
    b = _batch(cfg, [1, bs + 3, 5 * bs + 7, 9 * bs + 2], 4, bs, seed=case + 40)
    quest = Quest(budget, bs)
    tol = TOL[torch.float32]
    sparse, dense = _backend_decode(b, quest), _backend_decode(b, None)
    torch.testing.assert_close(sparse, quest_decode_reference(*b.args(), quest), atol=tol,
                               rtol=tol)
    torch.testing.assert_close(dense, decode_attention_reference(*b.args()), atol=tol, rtol=tol)
    assert (sparse[2:] - dense[2:]).abs().max() > 1e-2


# ----------------------------------------------------------------- settings


def _quest(**kw):
    return {"quest": kw}


def test_defaults_and_names():
    cfg = KvcompConfig.from_dict(_quest())
    assert (cfg.quest.budget_tokens, cfg.quest.dense_layers) == (2048, 2)
    cfg = KvcompConfig.from_dict(_quest(budget_tokens=512, dense_layers=0))
    assert cfg.quest.policy(128).budget_pages == 4
    assert hash(cfg) == hash(KvcompConfig.from_dict(_quest(budget_tokens=512, dense_layers=0)))
    assert KvcompConfig().quest is None


@pytest.mark.parametrize("kv, message", [
    (_quest(budget=4), "unknown kvcomp quest setting(s) ['budget']"),
    (_quest(budget_tokens=0), "budget_tokens=0 must be a positive"),
    (_quest(budget_tokens=-64), "budget_tokens=-64 must be a positive"),
    (_quest(budget_tokens=100.0), "budget_tokens=100.0 must be a positive"),
    (_quest(dense_layers=-1), "dense_layers=-1 must be an integer >= 0"),
    (_quest(dense_layers=True), "dense_layers=True must be an integer >= 0"),
    ({"quest": 2048}, "quest=2048 must be a dict"),
    ({"quest": {"budget_tokens": 64}, "block_size": 128},
     "budget_tokens=64 is smaller than one page (block_size=128"),
    ({"quest": {}, "eviction": {"method": "streamingllm"}},
     "quest and eviction (method='streamingllm') cannot be combined"),
    ({"quest": {}, "key_axis": "token"}, "needs keys quantized per channel"),
    ({"quest": {}, "k_bits": 16}, "needs keys quantized per channel"),
])
def test_bad_quest_settings_are_named(kv, message):
    with pytest.raises(KvcompConfigError) as e:
        KvcompConfig.from_dict(kv)
    assert message in str(e.value)


def test_first_layers_stay_dense():
    from types import SimpleNamespace

    from vllm_kvcomp.backend import KvcompImpl

    cfg = KvcompConfig.from_dict(_quest(budget_tokens=256, dense_layers=2))
    for layer, dense in ((0, True), (1, True), (2, False), (11, False)):
        impl = SimpleNamespace(config=cfg, _quest=False)
        quest = KvcompImpl._quest_for(impl, f"model.layers.{layer}.self_attn.attn", 32)
        assert (quest is None) == dense
        assert dense or quest == Quest(256, 32)
    impl = SimpleNamespace(config=KvcompConfig(), _quest=False)
    assert KvcompImpl._quest_for(impl, "model.layers.5.self_attn.attn", 32) is None


def _engine_args(tmp_path, kvcomp, **kw):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvcomp.tiny_model import make_tiny_llama

    model = make_tiny_llama(str(tmp_path / "tiny"))
    return EngineArgs(model=model, attention_backend="kvcomp", max_model_len=1024,
                      additional_config={"kvcomp": kvcomp}, **kw)


def test_gpu_platform_serves_quest_through_vllms_config_path(tmp_path, monkeypatch):
    """Quest's Triton kernels have served on a GPU: a GPU start-up takes it
    with no further switch, and still refuses what Quest cannot serve."""
    from vllm.platforms import current_platform

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)
    config = _engine_args(tmp_path, _quest(budget_tokens=512)).create_engine_config()
    assert config.additional_config["kvcomp"]["quest"] == {"budget_tokens": 512}
    with pytest.raises(ValueError, match="needs keys quantized per channel"):
        _engine_args(tmp_path, {**_quest(budget_tokens=512), "key_axis": "token"}
                     ).create_engine_config()


def test_budget_below_the_resolved_block_size_is_refused(tmp_path):
    # no kvcomp block_size: vLLM's block size rounded up to the 128-token key group
    args = _engine_args(tmp_path, _quest(budget_tokens=64))
    with pytest.raises(ValueError, match="budget_tokens=64 is smaller than one page"):
        args.create_engine_config()


# --------------------------------------------------------------- end to end


def test_engine_with_quest_end_to_end(tiny_llama):
    """A budget covering every sequence gives kvcomp's tokens. A 4-page budget
    past the first (dense) layer serves every request and changes what the
    long ones generate."""
    from e2e_util import POLICY_BASE as BASE, policy_spec, run_engines

    plain, wide, small = run_engines(
        dict(spec=policy_spec(tiny_llama, BASE), shared=True),
        dict(spec=policy_spec(tiny_llama, {**BASE, "quest": {"budget_tokens": 2048,
                                                             "dense_layers": 0}})),
        dict(spec=policy_spec(tiny_llama, {**BASE, "quest": {"budget_tokens": 128,
                                                             "dense_layers": 1}})))
    assert wide["tokens"] == plain["tokens"]
    assert [len(t) for t in small["tokens"]] == [24] * 4
    # the short request never passes its budget
    assert small["tokens"][3] == plain["tokens"][3]
    assert small["tokens"][:3] != plain["tokens"][:3]
    # Quest frees nothing: the same capacity
    assert small["kv_cache_tokens"] == plain["kv_cache_tokens"]
