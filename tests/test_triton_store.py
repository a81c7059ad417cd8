"""Triton store kernel (hand-over into packed pages + residual write) against
the PyTorch reference writers, byte for byte, on mixed batches driven through
simulated paged blocks (``sim_paged``).

Runs on CPU under ``TRITON_INTERPRET=1`` (conftest sets it when there is no GPU).
Tolerance: packed bytes must be equal, except that codes may differ by one
where a float rounding tie falls differently (< 0.1 % of the codes, none by
more than one) and fp16 scale/min by one ulp. Under the interpreter both sides
run the same IEEE float32 arithmetic, so the tests also report, and on CPU
require, exact equality.
"""
from __future__ import annotations

import pytest
import torch

from sim_paged import SimPagedCache
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels import packing
from vllm_kvcomp.kernels.attention_ref import kvcomp_step_reference
from vllm_kvcomp.layout import PageLayout
from vllm_kvcomp.kernels.triton_store import (
    handover_pieces,
    kvcomp_store,
    store_grid_bound,
    store_reference,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = not torch.cuda.is_available()  # interpreter: same IEEE fp32 ops as torch
BITS = [(16, 16), (8, 8), (4, 4), (2, 2), (4, 2)]
AXES = ["channel", "token"]
# key_axis means nothing for 16-bit keys: one case there.
BITS_AXES = [(b, a) for b in BITS for a in AXES if not (b[0] == 16 and a == "token")]
BITS_AXES_IDS = [f"k{b[0]}v{b[1]}-{a}" for b, a in BITS_AXES]
# The interpreter turns a 1-element array into a loop bound (numpy warns).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")


# ---------------------------------------------------------------- batch builder


def mixed_plans(cfg: KvcompConfig) -> list[tuple[int, int]]:
    """(cached tokens before the step, fresh tokens) per request: a decode
    that completes a key group (hand-over from residual + fresh), a decode
    that does not, a first prefill chunk, a chunk after a cached prefix
    (packed + residual), a short history that is all residual, and an empty
    padding request (CUDA-graph style). Lengths avoid multiples of 16/32."""
    G, R = cfg.group_size, cfg.residual_tokens
    return [(R + 3 * G - 1, 1), (0, 45), (70, 29), (R + 2 * G + 5, 1), (10, 20), (0, 0)]


class Step:
    """One step of a batch through a SimPagedCache whose history (the first
    ``start`` tokens of each request) was stored by the reference step."""

    def __init__(self, cfg, plans, H=2, D=64, rep=2, dtype=torch.float32, block_size=32,
                 seed=0, strided=False, pad_residual=False):
        self.cfg, self.plans, self.dtype = cfg, plans, dtype
        B = len(plans)
        max_len = max(max(s + q for s, q in plans), 1)
        sim = SimPagedCache(cfg, block_size, H, D, B, max_len, dtype=dtype, seed=seed)
        if pad_residual and sim.residual is not None:
            # vLLM hands the residual group a strided view padded to the
            # packed page size: keep that shape of tensor here.
            nb = sim.residual.shape[0]
            inner = sim.residual[0].numel()
            buf = torch.zeros(nb, inner + 40, dtype=sim.residual.dtype)
            view = buf[:, :inner].view(sim.residual.shape)
            view.copy_(sim.residual)
            sim.residual = view
        self.sim, self.layout, self.bs_r = sim, sim.layout, sim.bs_r
        g = torch.Generator().manual_seed(seed + 1)
        self.K = [torch.randn(s + q, H, D, generator=g).to(dtype) for s, q in plans]
        self.V = [torch.randn(s + q, H, D, generator=g).to(dtype) for s, q in plans]
        for k in self.K:  # a few large channels, as real keys have (KIVI)
            k[..., :3] *= 6
        # as the backend hands them over (rounded to an fp8 window's values)
        self.K = [packing.round_to_window(k, cfg) for k in self.K]
        self.V = [packing.round_to_window(v, cfg) for v in self.V]
        self.Qh = [(2 * torch.randn(s + q, H * rep, D, generator=g)).to(dtype) for s, q in plans]
        starts = [s for s, _ in plans]
        ends = [s + q for s, q in plans]
        hist = sim.batch([0] * B, starts)
        hk, hv, hq = (torch.cat([x[i][:s] for i, (s, _) in enumerate(plans)])
                      for x in (self.K, self.V, self.Qh))
        kvcomp_step_reference(hq, hk, hv, torch.empty_like(hq), sim.packed, sim.residual,
                              sim.layout, cfg, D ** -0.5, hist)
        self.batch = sim.batch(starts, ends)
        self.key, self.value, self.query = (
            torch.cat([x[i][s:] for i, (s, _) in enumerate(plans)])
            for x in (self.K, self.V, self.Qh))
        if strided:
            # vLLM passes q/k/v as column slices of one qkv projection.
            T = self.key.shape[0]
            qkv = torch.zeros(T, H * rep + 2 * H + 1, D, dtype=dtype)
            qkv[:, : H * rep] = self.query
            qkv[:, H * rep: H * rep + H] = self.key
            qkv[:, H * rep + H: H * rep + 2 * H] = self.value
            self.query = qkv[:, : H * rep]
            self.key = qkv[:, H * rep: H * rep + H]
            self.value = qkv[:, H * rep + H: H * rep + 2 * H]
        self.max_query_len = max(q for _, q in plans)
        self.scale = D ** -0.5

    # device copies of everything a kernel reads
    def dev(self):
        b = self.batch
        to = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
        return dict(
            key=to(self.key), value=to(self.value), query=to(self.query),
            packed=self.sim.packed.clone().to(DEVICE),
            residual=None if self.sim.residual is None else self.sim.residual.clone().to(DEVICE),
            block_table=to(b.block_table), residual_block_table=to(b.residual_block_table),
            residual_slot_mapping=to(b.residual_slot_mapping),
            query_start_loc=torch.tensor(b.query_start_loc, dtype=torch.int32, device=DEVICE),
            seq_lens=torch.tensor(b.seq_lens, dtype=torch.int32, device=DEVICE),
        )

    def reference_store(self):
        packed = self.sim.packed.clone()
        residual = None if self.sim.residual is None else self.sim.residual.clone()
        b = self.batch
        store_reference(self.key, self.value, packed, residual, b.block_table,
                        b.residual_block_table, b.residual_slot_mapping, b.query_start_loc,
                        b.seq_lens, self.layout, self.cfg, self.bs_r)
        return packed, residual

    def triton_store(self, **kw):
        d = self.dev()
        kvcomp_store(d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
                     d["residual_block_table"], d["residual_slot_mapping"],
                     d["query_start_loc"], d["seq_lens"], self.layout, self.cfg, self.bs_r,
                     self.max_query_len, **kw)
        return d["packed"].cpu(), None if d["residual"] is None else d["residual"].cpu()


# ---------------------------------------------------------------- comparators


def compare_packed(ref: torch.Tensor, out: torch.Tensor, layout) -> dict:
    """Counts of code / param differences; raises on anything beyond ties."""
    stats = {"codes": 0, "codes_off_by_one": 0, "params": 0, "params_off_by_ulp": 0}
    if torch.equal(ref, out):
        return stats
    cfg = layout.config
    for which, bits in (("k", cfg.k_bits), ("v", cfg.v_bits)):
        ca = packing._code_view(ref, layout, which)
        cb = packing._code_view(out, layout, which)
        if bits == 16:
            assert torch.equal(ca, cb), f"raw 16-bit {which} bytes differ"
            continue
        ua = packing.unpack_codes(ca, bits).int()
        ub = packing.unpack_codes(cb, bits).int()
        diff = (ua - ub).abs()
        stats["codes"] += ua.numel()
        stats["codes_off_by_one"] += int((diff == 1).sum())
        assert int(diff.max()) <= 1, f"{which} codes differ by {int(diff.max())}"
        pa = packing._param_view(ref, layout, which).contiguous().view(torch.int16).int()
        pb = packing._param_view(out, layout, which).contiguous().view(torch.int16).int()
        pdiff = (pa - pb).abs()
        stats["params"] += pa.numel()
        stats["params_off_by_ulp"] += int((pdiff == 1).sum())
        assert int(pdiff.max()) <= 1, f"{which} fp16 params differ by {int(pdiff.max())} ulp"
    assert stats["codes_off_by_one"] <= 1e-3 * max(stats["codes"], 1), stats
    return stats


def check_store(step: Step, **kw) -> dict:
    ref_p, ref_r = step.reference_store()
    out_p, out_r = step.triton_store(**kw)
    # The step must have written something (the test would be vacuous).
    assert not torch.equal(ref_p, step.sim.packed)
    stats = compare_packed(ref_p, out_p, step.layout)
    if EXACT:
        assert torch.equal(ref_p, out_p), stats
    if ref_r is not None:
        # Block 0 is the null block: fresh tokens outside the live window
        # all land there, in an undefined order in both implementations.
        assert torch.equal(ref_r[1:], out_r[1:])
    return stats


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("residual", [0, 24])
@pytest.mark.parametrize("bits, key_axis", BITS_AXES, ids=BITS_AXES_IDS)
def test_store_matches_reference_mixed_batch(bits, key_axis, residual):
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16,
                       residual_tokens=residual, key_axis=key_axis)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, seed=sum(bits) + residual)
    check_store(step)


@pytest.mark.parametrize(
    "bits, key_axis, residual, D, dtype, group, block",
    [
        ((4, 2), "channel", 24, 128, torch.bfloat16, 32, 32),
        ((8, 8), "token", 0, 128, torch.bfloat16, 32, 32),
        ((2, 2), "channel", 0, 128, torch.float16, 32, 32),
        ((16, 16), "channel", 24, 128, torch.float16, 32, 32),
        # head size not a power of two (padded tiles, 3 channel groups)
        ((4, 4), "token", 0, 96, torch.float32, 32, 32),
        ((4, 2), "channel", 24, 96, torch.bfloat16, 32, 32),
        # group >= head size: one (scale, min) per token; 64-token pages
        ((2, 4), "channel", 24, 64, torch.float32, 64, 64),
    ],
    ids=["k4v2-ch-bf16", "k8v8-tok-bf16", "k2v2-ch-fp16", "k16v16-fp16", "d96-k4v4-tok",
         "d96-k4v2-ch-bf16", "g64-k2v4-ch"],
)
def test_store_head_dims_groups_half_dtypes(bits, key_axis, residual, D, dtype, group, block):
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=group,
                       residual_tokens=residual, key_axis=key_axis)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, dtype=dtype, seed=7, block_size=block)
    check_store(step)


@pytest.mark.parametrize("kw", [{"num_unit_programs": 1}, {"num_unit_programs": 3},
                                {"fuse_residual_write": False}, {"split_handover": True},
                                {"split_handover": True, "num_unit_programs": 5}],
                         ids=["one-program-loops", "three-programs", "two-launches",
                              "split-pieces", "split-pieces-five-programs"])
def test_store_result_does_not_depend_on_grid_or_fusion(kw):
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=8)
    plans = [(0, 130), (37, 1), (50, 77)]  # several units per request
    step = Step(cfg, plans, H=2, D=64, seed=3)
    check_store(step, **kw)


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split-pieces"])
@pytest.mark.parametrize("key_axis", AXES)
def test_decode_batch_with_grid_bound_one(key_axis, split):
    """Pure decode: grid (num_reqs, 1, H), some requests completing a key
    group (whole group handed over from the residual + the fresh token)."""
    cfg = KvcompConfig(k_bits=2, v_bits=4, group_size=16, residual_tokens=24,
                       key_axis=key_axis)
    assert store_grid_bound(cfg, 1) == 1
    plans = [(24 + 16 * k - 1, 1) for k in (1, 2, 3)] + [(50, 1), (24, 1)]
    step = Step(cfg, plans, H=2, D=64, seed=5)
    assert step.max_query_len == 1
    check_store(step, split_handover=split)


def test_handover_pieces():
    """Serving shape (k4v4, group 128, head 128): 4 key channel slices of 32
    channels (4096 elements) and 4 value sub-tiles of 32 tokens."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=128)
    assert handover_pieces(cfg, PageLayout(cfg, 128, 128, 2)) == 8
    cfg2 = KvcompConfig(k_bits=2, v_bits=2, group_size=32)  # 32 x 128 keys fit one slice
    assert handover_pieces(cfg2, PageLayout(cfg2, 128, 128, 2)) == 2
    tok = KvcompConfig(k_bits=4, v_bits=4, key_axis="token")  # 16-token units, one sub-tile
    assert handover_pieces(tok, PageLayout(tok, 128, 128, 2)) == 1


def test_strided_qkv_and_padded_residual_view():
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, seed=11, strided=True, pad_residual=True)
    assert not step.key.is_contiguous() and not step.sim.residual.is_contiguous()
    check_store(step)


def test_store_reference_equals_full_reference_step():
    """The oracle used here writes exactly what kvcomp_step_reference writes."""
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, seed=17)
    ref_p, ref_r = step.reference_store()
    packed, residual = step.sim.packed.clone(), step.sim.residual.clone()
    kvcomp_step_reference(step.query, step.key, step.value, torch.empty_like(step.query),
                          packed, residual, step.layout, cfg, step.scale, step.batch)
    assert torch.equal(packed, ref_p)
    assert torch.equal(residual[1:], ref_r[1:])


def test_comparator_catches_swapped_nibbles():
    """The byte comparison is not vacuous: a kernel writing the two codes of
    a byte in the wrong order fails it."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=0)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, seed=19)
    ref_p, _ = step.reference_store()
    bad = ref_p.clone()
    codes = packing._code_view(bad, step.layout, "v")
    codes.copy_((codes >> 4) | (codes << 4))
    with pytest.raises(AssertionError):
        compare_packed(ref_p, bad, step.layout)


@pytest.mark.parametrize("bits, group, vgroup, D", [((2, 2), 32, 128, 128), ((4, 2), 16, 64, 64)],
                         ids=["k2v2-g32-vg128", "k4v2-g16-vg64"])
def test_store_value_groups_apart_from_key_groups(bits, group, vgroup, D):
    """value_group_size: 32-token key groups next to one value group a head."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=group, residual_tokens=24,
                       value_group_size=vgroup)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, dtype=torch.bfloat16, seed=5, block_size=64)
    check_store(step)


@pytest.mark.parametrize("bits, residual", [((4, 4), 0), ((2, 2), 24), ((4, 2), 8)])
def test_store_ring_window_writes_what_the_reference_step_writes(bits, residual):
    """A window held as a ring (``residual_ring``): the hand-over alone, then the
    residual write of the new window's tokens (``ring_window_slots``), leave
    the caches as the reference step does, with a chunk longer than the
    ring's span (its early tokens share slots with its last ones) and a
    decode that hands a key group over."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16,
                       residual_tokens=residual, residual_ring=True)
    plans = [(residual + 3 * 16 - 1, 1), (10, 150), (0, 45), (70, 29), (0, 0)]
    step = Step(cfg, plans, H=2, D=64, seed=sum(bits) + residual)
    assert step.sim.ring_pages * step.bs_r < 150
    packed, res = step.sim.packed.clone(), step.sim.residual.clone()
    kvcomp_step_reference(step.query, step.key, step.value, torch.empty_like(step.query),
                          packed, res, step.layout, cfg, step.scale, step.batch)
    d = step.dev()
    _store_as_ring(step, cfg, d)
    compare_packed(packed, d["packed"].cpu(), step.layout)
    assert torch.equal(res[1:], d["residual"].cpu()[1:])


def _store_args(step, cfg, d, residual_slots):
    return (d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
            d["residual_block_table"], residual_slots, d["query_start_loc"], d["seq_lens"],
            step.layout, cfg, step.bs_r, step.max_query_len)


def _store_as_ring(step, cfg, d):
    """The ring's two launches: the hand-over alone, then the new window's
    tokens into their ring slots (as the backend runs them, after attention)."""
    from vllm_kvcomp.kernels.triton_store import ring_window_slots

    kvcomp_store(*_store_args(step, cfg, d, None))
    slots = ring_window_slots(d["residual_slot_mapping"], d["query_start_loc"], d["seq_lens"],
                              cfg)
    kvcomp_store(*_store_args(step, cfg, d, slots), handover=False)


@pytest.mark.parametrize("bits, key_axis, ring, D, dtype", [
    ((4, 4), "channel", False, 64, torch.float32), ((2, 2), "channel", True, 128, torch.bfloat16),
    ((4, 2), "token", False, 64, torch.float16), ((16, 16), "channel", True, 64, torch.bfloat16)],
    ids=["k4v4-fp32", "k2v2-ring-bf16", "k4v2-token-fp16", "k16v16-ring-bf16"])
def test_store_fp8_window(bits, key_axis, ring, D, dtype):
    """residual_dtype="fp8_e4m3": the kernel's hand-over reads the e4m3
    window back and its residual write stores e4m3, byte for byte what the
    reference step writes (by position, or as a ring: hand-over, then the new
    window's tokens)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16, residual_tokens=24,
                       key_axis=key_axis, residual_ring=ring, residual_dtype="fp8_e4m3")
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, dtype=dtype, seed=sum(bits) + D,
                pad_residual=True)
    assert step.sim.residual.dtype == torch.float8_e4m3fn
    packed, res = step.sim.packed.clone(), step.sim.residual.clone()
    kvcomp_step_reference(step.query, step.key, step.value, torch.empty_like(step.query),
                          packed, res, step.layout, cfg, step.scale, step.batch)
    d = step.dev()
    if ring:
        _store_as_ring(step, cfg, d)
    else:
        kvcomp_store(*_store_args(step, cfg, d, d["residual_slot_mapping"]))
    assert not torch.equal(res[1:], step.sim.residual[1:])  # the step wrote its window
    compare_packed(packed, d["packed"].cpu(), step.layout)
    assert torch.equal(res[1:], d["residual"].cpu()[1:])
