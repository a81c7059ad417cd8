"""Triton chunked-prefill attention over packed pages + residual + fresh
tokens against its PyTorch reference (the attention half of
``kvcomp_step_reference``), on mixed batches through simulated paged blocks.

Runs on CPU under ``TRITON_INTERPRET=1`` (conftest sets it when there is no GPU).
Tolerances: float32 models atol = rtol = 2e-3 (IEEE fp32 dots; measured
~1e-6 in the interpreter), fp16/bf16 models atol = rtol = 2e-2 (outputs are
rounded to the model dtype; on a GPU the dots take bf16/fp16 K/V tiles). Note
that the interpreter runs every dot in fp32 (its bf16 ``tl.dot`` is broken),
so the half-precision tensor-core path is only exercised on a GPU.
"""
from __future__ import annotations

import pytest
import torch
import triton

from sim_paged import SimPagedCache
from test_triton_store import BITS_AXES, BITS_AXES_IDS, DEVICE, Step, mixed_plans
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.attention_ref import (
    attention_lse,
    kvcomp_step_reference,
    merge_partials,
)
from vllm_kvcomp.kernels import attention_ref
from vllm_kvcomp.kernels.packing import round_to_window
from vllm_kvcomp.kernels.triton_prefill import (
    kvcomp_prefill_attention,
    prefill_attention_reference,
)
from vllm_kvcomp.kernels.triton_store import kvcomp_store

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

TOL = {torch.float32: 2e-3, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def reference_out(step: Step, as_stored=False) -> torch.Tensor:
    b = step.batch
    return prefill_attention_reference(
        step.query, step.key, step.value, step.sim.packed, step.sim.residual, b.block_table,
        b.residual_block_table, b.query_start_loc, b.seq_lens, step.layout, step.cfg,
        step.scale, step.bs_r, as_stored=as_stored)


def triton_out(step: Step, max_query_len=None, block_n=32, **kw) -> torch.Tensor:
    d = step.dev()
    out = torch.full_like(d["query"], float("nan")).contiguous()
    kvcomp_prefill_attention(
        d["query"], d["key"], d["value"], d["packed"], d["residual"], d["block_table"],
        d["residual_block_table"], d["query_start_loc"], d["seq_lens"], step.layout, step.cfg,
        step.scale, step.bs_r, max_query_len or step.max_query_len, out, block_n=block_n, **kw)
    # Attention reads the caches only.
    assert torch.equal(d["packed"].cpu(), step.sim.packed)
    return out.cpu()


def check(step: Step, as_stored=False, **kw):
    if as_stored:
        # prompts read the step's own hand-over: the store runs first
        step.sim.packed, step.sim.residual = step.reference_store()
    ref = reference_out(step, as_stored)
    out = triton_out(step, as_stored=as_stored, **kw)
    assert not out.isnan().any()
    tol = TOL[step.dtype]
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)
    return (out.float() - ref.float()).abs().max().item()


@pytest.mark.parametrize("residual", [0, 24])
@pytest.mark.parametrize("bits, key_axis", BITS_AXES, ids=BITS_AXES_IDS)
def test_prefill_matches_reference_mixed_batch(bits, key_axis, residual):
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16,
                       residual_tokens=residual, key_axis=key_axis)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, seed=sum(bits) + residual)
    # Packed prefix, residual and fresh parts are all present in the batch.
    assert any(cfg.quantized_prefix_len(s) > 0 for s, _ in step.plans)
    assert any(s > cfg.quantized_prefix_len(s) for s, _ in step.plans) or residual == 0
    check(step)


@pytest.mark.parametrize("residual", [0, 24])
@pytest.mark.parametrize("bits, key_axis", BITS_AXES, ids=BITS_AXES_IDS)
def test_prefill_as_stored_matches_reference_mixed_batch(bits, key_axis, residual):
    """Prompts attending as stored (each query reads keys below Q(its
    position) packed): the kernel against the reference, on a mixed batch
    whose chunks hand groups over within the step."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16,
                       residual_tokens=residual, key_axis=key_axis)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, seed=sum(bits) + residual + 1)
    assert any(cfg.quantized_prefix_len(s + q - 1) > cfg.quantized_prefix_len(s)
               for s, q in step.plans)
    check(step, as_stored=True)


@pytest.mark.parametrize("D, rep, dtype, block_rows", [
    (64, 3, torch.float32, 16), (128, 8, torch.bfloat16, 64), (128, 4, torch.float16, 32)],
    ids=lambda x: str(x).replace("torch.", ""))
def test_prefill_as_stored_shapes_and_tiles(D, rep, dtype, block_rows):
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=32, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, rep=rep, dtype=dtype, seed=D + rep + 3)
    check(step, as_stored=True, block_rows=block_rows)


@pytest.mark.parametrize(
    "D, rep, dtype",
    [(64, 1, torch.float32), (64, 8, torch.float32), (64, 3, torch.float32),
     (128, 1, torch.bfloat16), (128, 4, torch.float32), (128, 8, torch.bfloat16),
     (128, 4, torch.float16), (96, 4, torch.float32)],
    ids=lambda x: str(x).replace("torch.", ""),
)
def test_prefill_head_dims_gqa_ratios_dtypes(D, rep, dtype):
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=32, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, rep=rep, dtype=dtype, seed=D + rep)
    check(step)


@pytest.mark.parametrize(
    "bits, key_axis, D, group, block, block_n",
    [((4, 4), "token", 96, 32, 32, 32),    # 3 channel groups: gathered params
     ((2, 4), "channel", 64, 64, 64, 32),  # group >= head size; tile inside a group
     ((4, 2), "channel", 64, 16, 64, 64),  # tile of 4 key groups
     ((8, 2), "token", 128, 128, 32, 16)],  # one param per token
    ids=["d96-tok", "g64-ch-tile32", "g16-ch-tile64", "d128-g128-tok-tile16"],
)
def test_prefill_param_layouts_and_tiles(bits, key_axis, D, group, block, block_n):
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=group, residual_tokens=24,
                       key_axis=key_axis)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, rep=2, seed=D + group, block_size=block)
    check(step, block_n=block_n)


@pytest.mark.parametrize("block_rows, block_n", [(64, 32), (128, 64)])
def test_prefill_long_fresh_chunks_tuned_launch(block_rows, block_n):
    """Fresh chunks of several key tiles, so every program past the first
    tiles takes the unmasked fresh loop before its masked diagonal tile(s)
    (BLOCK_N both below and above BLOCK_T), at a bench-tuned style launch."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=24)
    G, R = cfg.group_size, cfg.residual_tokens
    plans = [(R + 3 * G - 1, 1), (0, 150), (70, 131), (5, 1), (0, 0)]
    step = Step(cfg, plans, H=2, D=64, rep=4, seed=47, block_size=64)
    block_t = block_rows // 4  # query tokens per program (GQA group of 4)
    last_t0 = (max(q for _, q in plans) - 1) // block_t * block_t
    assert last_t0 // block_n >= 2  # its program has >= 2 unmasked fresh tiles
    check(step, block_rows=block_rows, block_n=block_n, num_warps=8, num_stages=3)


@pytest.mark.parametrize("key_axis", ["channel", "token"])
def test_prefill_kernel_on_decode_only_batch(key_axis):
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=24,
                       key_axis=key_axis)
    plans = [(24 + 16 * k - 1, 1) for k in (1, 2, 3)] + [(50, 1), (5, 1)]
    step = Step(cfg, plans, H=2, D=64, rep=4, seed=23)
    check(step)


def _context_only(step: Step, row_base: int, **kw):
    """The kernel's context-only mode (no fresh tokens) with LSE, writing the
    batch's rows [row_base, T) to row 0 on of its outputs."""
    d = step.dev()
    T, Hq, D = d["query"].shape
    out = torch.full((T - row_base, Hq, D), float("nan"), dtype=step.dtype, device=DEVICE)
    lse = torch.full((Hq, T - row_base), float("nan"), device=DEVICE)
    b = step.batch
    first = next(i for i, q in enumerate(b.query_start_loc) if q >= row_base)
    kvcomp_prefill_attention(
        d["query"], d["key"], d["value"], d["packed"], d["residual"], d["block_table"][first:],
        d["residual_block_table"][first:] if d["residual_block_table"] is not None else None,
        d["query_start_loc"][first:], d["seq_lens"][first:], step.layout, step.cfg, step.scale,
        step.bs_r, step.max_query_len, out, block_n=32, include_fresh=False, lse=lse,
        out_row_base=row_base, **kw)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("residual, dtype", [(24, torch.float32), (0, torch.float32),
                                             (24, torch.bfloat16)],
                         ids=["r24-fp32", "r0-fp32", "r24-bf16"])
def test_prefill_context_only_with_lse_merges_to_full_attention(residual, dtype):
    """The split GPU prefill path: this kernel over the cached context (packed
    + residual) with its LSE, FlashAttention over the fresh tokens, merged.
    Here a PyTorch causal attention stands in for FlashAttention; the merge of
    the two partials must equal the one-pass reference (tolerances as above),
    the context-only output and LSE must equal the reference's (LSE: fp32,
    1e-3 / half-precision models 2e-2), rows without context get LSE -inf."""
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=residual)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, dtype=dtype, seed=41 + residual)
    b = step.batch
    row_base = b.query_start_loc[1]  # skip the leading decode, as the backend does
    out, lse = _context_only(step, row_base)
    T = step.query.shape[0]
    ref_out = torch.zeros(T, *step.query.shape[1:], dtype=torch.float32)
    ref_lse = torch.full((step.query.shape[1], T), float("-inf"))
    prefill_attention_reference(
        step.query, step.key, step.value, step.sim.packed, step.sim.residual, b.block_table,
        b.residual_block_table, b.query_start_loc, b.seq_lens, step.layout, cfg, step.scale,
        step.bs_r, out=ref_out, include_fresh=False, lse=ref_lse)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref_out[row_base:], atol=tol, rtol=tol)
    ref_lse = ref_lse[:, row_base:]
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    assert torch.isinf(lse).any() and (~torch.isinf(lse)).any()  # both kinds of rows present
    fin = ~torch.isinf(ref_lse)
    lse_tol = 1e-3 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lse[fin], ref_lse[fin], atol=lse_tol, rtol=lse_tol)
    # fresh part: causal attention over each request's own new tokens
    fresh_out = torch.zeros_like(ref_out)
    fresh_lse = torch.full_like(ref_lse, float("-inf"))
    qsl = b.query_start_loc
    for i in range(len(b.seq_lens)):
        qs, qe = qsl[i], qsl[i + 1]
        if qe == qs or qs < row_base:
            continue
        fresh_out[qs:qe] = attention_ref.attend(step.query[qs:qe], step.key[qs:qe],
                                                step.value[qs:qe], step.scale, 0)
        fresh_lse[:, qs - row_base:qe - row_base] = attention_lse(
            step.query[qs:qe], step.key[qs:qe], step.scale, 0)
    merged = merge_partials(out, lse, fresh_out[row_base:], fresh_lse)
    full = reference_out(step)[row_base:]
    torch.testing.assert_close(merged, full.float(), atol=tol, rtol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM's FlashAttention needs a GPU")
@pytest.mark.parametrize("residual, dtype", [(24, torch.bfloat16), (0, torch.float16),
                                             (128, torch.bfloat16)],
                         ids=["r24-bf16", "r0-fp16", "r128-bf16"])
def test_prefill_with_flash_attn_matches_reference(residual, dtype):
    """fresh_prefill='flash_attn' (or 'auto' on CUDA) for prefill rows:
    FlashAttention over the fresh tokens + this kernel over the context,
    merged by vLLM's merge_attn_states; rows [row_base, T) against the
    one-pass reference (tolerance of the half-precision models above)."""
    from vllm.v1.attention.backends.fa_utils import flash_attn_varlen_func, get_flash_attn_version
    from vllm.v1.attention.ops.merge_attn_states import merge_attn_states

    from vllm_kvcomp.kernels.triton_prefill import prefill_with_flash_attn

    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=residual)
    step = Step(cfg, mixed_plans(cfg), H=2, D=128, rep=4, dtype=dtype, seed=43 + residual)
    b = step.batch
    row_base = b.query_start_loc[1]
    first = 1
    d = step.dev()
    out = torch.full_like(d["query"], float("nan"))
    prefill_with_flash_attn(
        d["query"], d["key"], d["value"], out, d["packed"], d["residual"],
        d["block_table"][first:],
        d["residual_block_table"][first:] if d["residual_block_table"] is not None else None,
        d["query_start_loc"][first:], d["seq_lens"][first:], step.layout, cfg, step.scale,
        step.bs_r, step.max_query_len, row_base, b.query_start_loc[-1],
        flash_attn_varlen_func, get_flash_attn_version(head_size=128), merge_attn_states)
    got = out.cpu()[row_base:b.query_start_loc[-1]].float()
    ref = reference_out(step)[row_base:b.query_start_loc[-1]].float()
    assert not got.isnan().any()
    torch.testing.assert_close(got, ref, atol=TOL[dtype], rtol=TOL[dtype])


def test_prefill_strided_qkv_padded_residual_and_oversized_grid():
    cfg = KvcompConfig(k_bits=8, v_bits=4, group_size=16, residual_tokens=24, key_axis="token")
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=2, seed=29, strided=True,
                pad_residual=True)
    check(step, max_query_len=step.max_query_len + 40, block_rows=32)


@pytest.mark.parametrize("as_stored", [False, True])
def test_prefill_reference_equals_full_reference_step(as_stored):
    """The oracle used here computes what kvcomp_step_reference outputs."""
    cfg = KvcompConfig(k_bits=2, v_bits=4, group_size=16, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, seed=31)
    full = torch.empty_like(step.query)
    kvcomp_step_reference(step.query, step.key, step.value, full, step.sim.packed.clone(),
                          step.sim.residual.clone(), step.layout, cfg, step.scale, step.batch,
                          as_stored=as_stored)
    if as_stored:
        step.sim.packed, step.sim.residual = step.reference_store()
    torch.testing.assert_close(reference_out(step, as_stored), full, atol=0, rtol=0)


def test_prefill_detects_wrong_nibble_order():
    """The comparison is not vacuous: swapping the nibbles of the packed
    values the kernel reads moves the output far beyond the tolerance."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=0)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, seed=37)
    ref = reference_out(step)
    from vllm_kvcomp.kernels import packing

    for which in ("k", "v"):
        codes = packing._code_view(step.sim.packed, step.layout, which)
        codes.copy_((codes >> 4) | (codes << 4))
    out = triton_out(step)
    assert (out - ref).abs().max() > 20 * TOL[torch.float32]


@pytest.mark.parametrize("residual_dtype", ["auto", "fp8_e4m3"])
@pytest.mark.parametrize("as_stored", [False, True])
def test_triton_steps_reproduce_reference_steps(as_stored, residual_dtype):
    """Several batch steps (chunked prefill, then decodes crossing group
    boundaries) run with the Triton prefill + store kernels give the outputs
    and caches of the reference step (the backend's order: store, then
    attention); with an fp8 window too (K/V rounded as the backend rounds
    them)."""
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=8,
                       residual_dtype=residual_dtype)
    H, rep, D = 2, 4, 64
    chunks = [[37, 30, 1, 1, 1, 1], [5, 20, 1, 40, 1, 1]]
    total = [sum(c) for c in chunks]
    g = torch.Generator().manual_seed(41)
    K = [round_to_window(torch.randn(T, H, D, generator=g), cfg) for T in total]
    V = [round_to_window(torch.randn(T, H, D, generator=g), cfg) for T in total]
    Qh = [2 * torch.randn(T, H * rep, D, generator=g) for T in total]
    sims = [SimPagedCache(cfg, 32, H, D, 2, max(total), seed=43) for _ in range(2)]
    done = [0, 0]
    for step in range(len(chunks[0])):
        starts = list(done)
        ends = [s + c[step] for s, c in zip(starts, chunks)]
        sl = lambda xs: torch.cat([x[s:e] for x, s, e in zip(xs, starts, ends)])  # noqa: E731
        q, k, v = sl(Qh), sl(K), sl(V)
        ba, bb = sims[0].batch(starts, ends), sims[1].batch(starts, ends)
        ref = torch.empty_like(q)
        kvcomp_step_reference(q, k, v, ref, sims[0].packed, sims[0].residual, sims[0].layout,
                              cfg, D ** -0.5, ba, as_stored=as_stored)
        s = sims[1]
        dev = lambda t: t.to(DEVICE)  # noqa: E731
        qsl = torch.tensor(bb.query_start_loc, dtype=torch.int32, device=DEVICE)
        lens = torch.tensor(bb.seq_lens, dtype=torch.int32, device=DEVICE)
        packed, residual = dev(s.packed), dev(s.residual)
        mql = max(e - s_ for s_, e in zip(starts, ends))
        out = torch.empty_like(dev(q))
        kvcomp_store(dev(k), dev(v), packed, residual, dev(bb.block_table),
                     dev(bb.residual_block_table), dev(bb.residual_slot_mapping), qsl, lens,
                     s.layout, cfg, s.bs_r, mql)
        kvcomp_prefill_attention(dev(q), dev(k), dev(v), packed, residual, dev(bb.block_table),
                                 dev(bb.residual_block_table), qsl, lens, s.layout, cfg,
                                 D ** -0.5, s.bs_r, mql, out, block_n=32, as_stored=as_stored)
        s.packed.copy_(packed.cpu())
        s.residual.copy_(residual.cpu())
        torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)
        done = ends
    assert torch.equal(sims[0].packed, sims[1].packed)
    assert torch.equal(sims[0].residual[1:], sims[1].residual[1:])


def test_prefill_falls_back_when_the_gpu_lacks_resources(monkeypatch):
    """A launch that needs more shared memory than the GPU has (a smaller GPU
    than the tuning one, or a larger head) is retried with smaller ones, once:
    the launch that ran is remembered. Stand-in: the kernel raises Triton's
    OutOfResources above 2 stages or 32-key tiles, as a launcher would."""
    from vllm_kvcomp.kernels import triton_prefill as tp

    real, tried = tp._kvcomp_prefill_kernel, []

    class SmallGpu:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                tried.append((kw["BLOCK_N"], kw["num_stages"]))
                if kw["num_stages"] > 2 or kw["BLOCK_N"] > 32:
                    raise triton.runtime.errors.OutOfResources(1 << 18, 1 << 17, "shared memory")
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(tp, "_kvcomp_prefill_kernel", SmallGpu())
    monkeypatch.setattr(tp, "_FITTED", {})
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=32, residual_tokens=24)
    step = Step(cfg, mixed_plans(cfg), H=2, D=64, rep=4, seed=41, block_size=64)
    launch = dict(block_rows=64, block_n=64, num_warps=4, num_stages=3)
    check(step, **launch)
    assert tried == [(64, 3), (64, 2), (32, 2)]
    tried.clear()
    check(step, **launch)  # remembered: straight to the launch that ran
    assert tried == [(32, 2)]
    with pytest.raises(triton.runtime.errors.OutOfResources):  # benchmarks: no fallback
        triton_out(step, allow_smaller_launch=False, **launch)
    assert list(tp._smaller_launches(128, 128, 8, 3)) == [
        (128, 128, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2),
        (64, 32, 4, 1)]


@pytest.mark.parametrize("bits, group, vgroup, D", [((2, 2), 32, 128, 128), ((4, 4), 16, 32, 64)],
                         ids=["k2v2-g32-vg128", "k4v4-g16-vg32"])
def test_prefill_value_groups_apart_from_key_groups(bits, group, vgroup, D):
    """value_group_size: key groups and value channel groups of their own."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=group, residual_tokens=24,
                       value_group_size=vgroup)
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, rep=2, seed=group + vgroup, block_size=64)
    check(step)


@pytest.mark.parametrize("bits, key_axis, D, rep, dtype, as_stored", [
    ((4, 4), "channel", 64, 4, torch.float32, False),
    ((2, 2), "channel", 128, 8, torch.bfloat16, True),
    ((4, 2), "token", 64, 1, torch.float16, True),
    ((8, 8), "channel", 64, 3, torch.float32, True)],
    ids=["k4v4-fp32-rep4", "k2v2-d128-bf16-rep8-as-stored", "k4v2-token-fp16-rep1-as-stored",
         "k8v8-fp32-rep3-as-stored"])
def test_prefill_fp8_window(bits, key_axis, D, rep, dtype, as_stored):
    """residual_dtype="fp8_e4m3": the kernel reads the e4m3 window back in
    the model dtype, as the reference does, on mixed batches (packed prefix,
    window and fresh tokens; contexts off the group and block sizes)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16, residual_tokens=24,
                       key_axis=key_axis, residual_dtype="fp8_e4m3")
    step = Step(cfg, mixed_plans(cfg), H=2, D=D, rep=rep, dtype=dtype, seed=D + rep,
                pad_residual=True)
    assert step.sim.residual.dtype == torch.float8_e4m3fn
    assert any(s > cfg.quantized_prefix_len(s) for s, _ in step.plans)
    check(step, as_stored=as_stored)
