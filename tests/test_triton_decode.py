"""Triton decode attention over packed pages (``triton_decode``) against its
PyTorch reference, which is itself checked against the decode step of
``attention_ref.kvcomp_step_reference``.

Histories are written with the reference writers (``packing``): packed pages
for ``[0, Q(start))``, residual pages for ``[Q(start), start)``, in shuffled
block ids, for batches of requests of different lengths (not multiples of the
group or block size; some with ``Q(start) = 0``, i.e. residual and fresh
token only; one of length 1). Every kernel case runs with one split (the
kernel writes the output) and with several (partials + merge kernel).

Runs on CPU under ``TRITON_INTERPRET=1`` (conftest sets it when there is no GPU).
Tolerances: float32 models atol = rtol = 2e-3 (IEEE fp32 dots; ~1e-6 seen in
the interpreter), bf16 models atol = rtol = 2e-2 (output rounded to bf16; on a
GPU the dots take bf16 operands). The interpreter runs every dot in fp32 (its
bf16 ``tl.dot`` is broken), so the tensor-core path is only covered on a GPU.
"""
from __future__ import annotations

import pytest
import torch

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.attention_ref import BatchView, kvcomp_step_reference
from vllm_kvcomp.kernels.decode_batch import TOL, DecodeBatch, lens_for
from vllm_kvcomp.kernels.decode_launch import (
    DEFAULT_LAUNCH,
    decode_num_splits,
    decode_tiles,
    decode_tiles_and_slices,
    decode_warp_tiles,
    decode_warps_stages,
)
from vllm_kvcomp.kernels.triton_common import layout_constexprs
from vllm_kvcomp.kernels.triton_decode import kvcomp_decode_attention
from vllm_kvcomp.layout import PageLayout

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter turns a 1-element array into a loop bound (numpy warns).
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim")

BITS_AXES = [((16, 16), "channel"), ((8, 8), "channel"), ((4, 4), "channel"),
             ((2, 2), "channel"), ((4, 2), "channel"), ((8, 8), "token"),
             ((4, 4), "token"), ((2, 2), "token"), ((4, 2), "token")]
BITS_AXES_IDS = [f"k{b[0]}v{b[1]}-{a}" for b, a in BITS_AXES]


def check(batch: DecodeBatch, splits=(1, 3), **kw):
    ref = batch.reference()
    tol = TOL[batch.dtype]
    for s in splits:
        out = batch.triton(num_splits=s, device=DEVICE, **kw)
        assert out.dtype == batch.dtype
        torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol,
                                   msg=lambda m: f"num_splits={s}: {m}")


# ---------------------------------------------------------------- oracle


def test_reference_matches_step_reference():
    """decode_attention_reference is the attention of kvcomp_step_reference."""
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=8)
    b = DecodeBatch(cfg, lens_for(cfg))
    B = len(b.lens)
    out = torch.empty_like(b.query)
    batch = BatchView(query_start_loc=list(range(B + 1)), seq_lens=b.lens,
                      block_table=b.block_table, residual_block_table=b.residual_table,
                      residual_slot_mapping=None, residual_block_size=b.bs_r)
    kvcomp_step_reference(b.query, b.key_new, b.value_new, out, b.packed.clone(),
                          b.residual, b.layout, cfg, b.scale, batch)
    torch.testing.assert_close(b.reference(), out, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- kernel


@pytest.mark.parametrize("bits,axis", BITS_AXES, ids=BITS_AXES_IDS)
def test_bits_and_key_axis(bits, axis):
    """Every code width, per-channel and per-token keys, with channel groups
    smaller than the head (values / per-token keys dequantized in registers)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16, residual_tokens=8,
                       key_axis=axis)
    check(DecodeBatch(cfg, lens_for(cfg), seed=sum(bits)))


@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("rep", [1, 4, 8])
def test_head_dim_and_gqa(D, rep):
    """group_size == head_size: the folded paths (scale in the query for keys,
    in the probabilities for values), one tile per key group."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=D, residual_tokens=16)
    check(DecodeBatch(cfg, [3, 2 * D + 20, 3 * D + 17], D=D, rep=rep, block_size=2 * D,
                      seed=D + rep))


@pytest.mark.parametrize("bits,axis", [((4, 4), "token"), ((2, 2), "token"),
                                       ((8, 2), "channel"), ((2, 8), "channel")],
                         ids=["k4v4-token", "k2v2-token", "k8v2-channel", "k2v8-channel"])
def test_folded_paths(bits, axis):
    """group_size == head_size with other widths; per-token keys take the
    per-column scale path."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=64, residual_tokens=16,
                       key_axis=axis)
    check(DecodeBatch(cfg, [2, 150, 211], D=64, rep=2, block_size=64, seed=7))


@pytest.mark.parametrize("bits,axis", [((4, 4), "channel"), ((4, 4), "token"),
                                       ((16, 16), "channel"), ((2, 4), "token")],
                         ids=["k4v4-channel", "k4v4-token", "k16v16", "k2v4-token"])
def test_no_residual_tokens(bits, axis):
    """residual_tokens = 0: per-channel keys still keep a partial group in the
    residual pages; per-token and 16-bit configs have no residual cache."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16, residual_tokens=0,
                       key_axis=axis)
    b = DecodeBatch(cfg, [1, 2, 17, 40, 70], seed=3)
    assert (b.residual is None) == (not cfg.needs_residual_cache)
    check(b)


@pytest.mark.parametrize("bits,axis,G", [((4, 4), "channel", 64), ((2, 8), "token", 64),
                                         ((8, 2), "channel", 16)],
                         ids=["k4v4-channel", "k2v8-token", "k8v2-channel-g16"])
def test_mantissa_code_conversion(bits, axis, G):
    """code_cvt=1: codes enter the dots as fp16 ``1024 + code`` and the offset
    is taken out through the per-row bias (the GPU's fp16/bf16 fast path; here
    exercised with fp32 dots)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_tokens=16,
                       key_axis=axis)
    check(DecodeBatch(cfg, [2, 150], D=64, rep=2, block_size=64, seed=19), code_cvt=1)


@pytest.mark.parametrize("key_fold", ["split", "fp16", "bf16"])
@pytest.mark.parametrize("bits", [(2, 2), (4, 2)], ids=["k2v2", "k4v2"])
def test_key_fold(bits, key_fold):
    """The ways bf16 GPU decode folds per-channel key scales into the query
    (``key_fold``): hi + lo bf16 operands, fp16 operands (fp16 codes, magic
    1024), one bf16 operand. Under the interpreter's fp32 dots they coincide,
    so this checks the code paths and their bookkeeping, not the gain; the
    gain (bf16 outputs 0.038 -> 7e-5 off at 2 bits on keys with outlier
    channels, in a PyTorch model of the split fold) is the GPU test_bf16's."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=64, residual_tokens=16)
    batch = DecodeBatch(cfg, [2, 150, 211], D=64, rep=2, block_size=64, seed=31)
    check(batch, key_fold=key_fold)
    check(batch, key_fold=key_fold, code_cvt=1)  # with the offset's row bias


@pytest.mark.parametrize("bits,D,elem", [((4, 4), 64, 8), ((4, 4), 64, 16), ((8, 8), 64, 8),
                                         ((8, 2), 64, 16), ((2, 2), 128, 16)],
                         ids=["k4v4-e8", "k4v4-e16", "k8v8-e8", "k8v2-e16", "k2v2-d128-e16"])
def test_code_element_width(bits, D, elem):
    """Codes read as bytes or as 16-bit elements (phases: channels
    ``(elem / bits) * w + j``), whatever the default for the width is."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=D, residual_tokens=16)
    check(DecodeBatch(cfg, [3, 2 * D + 5], D=D, rep=2, block_size=D, seed=23), elem_bits=elem)


@pytest.mark.parametrize("bits,axis,D,elem", [((4, 4), "channel", 64, None),
                                              ((8, 2), "token", 64, None),
                                              ((8, 4), "channel", 64, 8),
                                              ((2, 2), "token", 128, 16)],
                         ids=["k4v4-channel", "k8v2-token", "k8v4-e8", "k2v2-d128-e16"])
def test_fp16(bits, axis, D, elem):
    """fp16 models: on a GPU, codes enter fp16 dots as 1024 + code (8-bit
    codes too), through every PTX unpacking variant for fp16."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=D, residual_tokens=16,
                       key_axis=axis)
    check(DecodeBatch(cfg, [1, D + 26, 3 * D + 11], D=D, rep=4, block_size=D,
                      dtype=torch.float16, seed=29), elem_bits=elem)


def test_small_key_groups():
    """group_size 8 < the 16-token tile: several key groups per tile, keys
    dequantized in registers."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=8, residual_tokens=4)
    check(DecodeBatch(cfg, [1, 12, 45, 90], seed=5))


@pytest.mark.parametrize("bits,axis,D,elem", [((4, 4), "channel", 64, None),
                                              ((2, 2), "token", 64, None),
                                              ((16, 16), "channel", 64, None),
                                              ((4, 2), "channel", 64, 8),
                                              ((2, 2), "channel", 128, 16)],
                         ids=["k4v4-channel", "k2v2-token", "k16v16", "k4v2-e8",
                              "k2v2-d128-e16"])
@pytest.mark.parametrize("key_fold", ["split", "fp16"])
def test_bf16(bits, axis, D, elem, key_fold):
    """bf16 models; on a GPU every PTX unpacking variant for bf16 (bytes and
    16-bit elements, 2 and 4 bits) runs here, with both accurate key folds
    (hi + lo bf16 operands; fp16 operands and fp16 codes)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=D, residual_tokens=16,
                       key_axis=axis)
    check(DecodeBatch(cfg, [1, D + 26, 3 * D + 11], D=D, rep=4, block_size=D,
                      dtype=torch.bfloat16, seed=11), elem_bits=elem, key_fold=key_fold)


def test_more_splits_than_tiles_and_padding():
    """Empty splits, a request of length 0 (CUDA-graph padding: zeros), the
    default split heuristic, and a loose max_seq_len bound."""
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=8)
    b = DecodeBatch(cfg, [0, 30, 75], seed=13)
    ref = b.reference()
    assert torch.equal(ref[0], torch.zeros_like(ref[0]))
    for s in (1, 4, None):
        out = b.triton(num_splits=s, max_seq_len=128, device=DEVICE)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)


def test_strided_inputs():
    """q / k / v as column slices of one qkv projection, a strided output and
    a padded residual view, as vLLM passes them."""
    cfg = KvcompConfig(k_bits=4, v_bits=2, group_size=16, residual_tokens=8)
    b = DecodeBatch(cfg, [5, 60, 101], rep=2, pad_residual=True, seed=17)
    ref = b.reference()
    B, Hq, D = b.query.shape
    H = b.key_new.shape[1]
    qkv = torch.zeros(B, Hq + 2 * H + 1, D, dtype=b.dtype)
    qkv[:, :Hq], qkv[:, Hq: Hq + H], qkv[:, Hq + H: Hq + 2 * H] = b.query, b.key_new, b.value_new
    qkv = qkv.to(DEVICE)
    args = list(b.args(DEVICE))
    args[0], args[1], args[2] = qkv[:, :Hq], qkv[:, Hq: Hq + H], qkv[:, Hq + H: Hq + 2 * H]
    for s in (1, 2):
        out_buf = torch.full((B, Hq, D + 8), float("nan"), device=DEVICE)
        out = kvcomp_decode_attention(*args, 128, num_splits=s, out=out_buf[:, :, :D])
        assert out.data_ptr() == out_buf.data_ptr()
        torch.testing.assert_close(out.cpu(), ref, atol=2e-3, rtol=2e-3)
        assert torch.isnan(out_buf[:, :, D:]).all()


# ---------------------------------------------------------------- host logic


def test_split_heuristic():
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=128, residual_tokens=128)
    layout = PageLayout(cfg, 128, 128)
    bn = decode_tiles(layout)
    assert bn == 128
    # nothing packed yet: one split
    assert decode_num_splits(1, 8, 200, cfg, bn) == 1
    # one request: spread over the GPU, bounded by the tiles
    s1 = decode_num_splits(1, 8, 1024, cfg, bn)
    assert 1 < s1 <= 64
    # big batch at long context: few splits, since B * H already fills it
    assert decode_num_splits(64, 8, 32768, cfg, bn, programs_per_sm=4) == 2
    assert decode_num_splits(256, 8, 32768, cfg, bn, programs_per_sm=4) == 1
    assert decode_num_splits(1, 8, 131072, cfg, bn) == 64
    # tiles never straddle a key group or a page
    assert decode_tiles(PageLayout(KvcompConfig(group_size=32, block_size=64), 64, 128)) == 32
    assert decode_tiles(PageLayout(KvcompConfig(k_bits=16, v_bits=16), 48, 128)) == 16


# ---------------------------------------------------------------- warp tiles

WARP_TILE_CASES = [((4, 4), "channel", 64, 4), ((2, 2), "channel", 64, 4),
                   ((4, 2), "channel", 64, 1), ((8, 8), "channel", 64, 8),
                   ((4, 4), "token", 64, 4), ((2, 4), "token", 64, 4),
                   ((4, 4), "channel", 128, 4)]


@pytest.mark.parametrize("warp_tiles", [1, 2, 4])
@pytest.mark.parametrize("bits,axis,D,rep", WARP_TILE_CASES,
                         ids=[f"k{b[0]}v{b[1]}-{a}-d{D}-rep{r}" for b, a, D, r in WARP_TILE_CASES])
def test_warp_tiles(bits, axis, D, rep, warp_tiles):
    """The warp-tile packed loop (each warp its own slice of a tile, batched
    dots, states merged after the loop) against the reference: one group and
    one page per tile (64 tokens; 128 at D=128, where a value row must be one
    channel group), so 2 or 4 slices of 16 to 64 tokens. warp_tiles=1: the
    shared tile on the same layouts (the default launch takes warp tiles
    there, so the other tests no longer reach it)."""
    G = max(64, D)
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, residual_tokens=16,
                       key_axis=axis)
    batch = DecodeBatch(cfg, lens_for(cfg), H=2, D=D, rep=rep, block_size=G, seed=21)
    consts = layout_constexprs(batch.layout)
    # the cases must take the warp-tile path, not fall back to the shared tile
    assert decode_warp_tiles(cfg, consts, decode_tiles(batch.layout), warp_tiles) == warp_tiles
    check(batch, warp_tiles=warp_tiles)


SLICE_CASES = [((4, 4), 16, 64, 64, 2), ((2, 2), 32, 128, 128, 2), ((4, 2), 32, 64, 128, 4),
               ((8, 8), 16, 64, 64, 4)]


@pytest.mark.parametrize("bits,G,D,bs,warp_tiles", SLICE_CASES,
                         ids=[f"k{b[0]}v{b[1]}-g{G}-d{D}-bs{bs}-wt{w}"
                              for b, G, D, bs, w in SLICE_CASES])
def test_warp_tiles_span_key_groups(bits, G, D, bs, warp_tiles):
    """Key groups shorter than the tile (KIVI-2's 32 tokens) with values in
    one channel group: the warp-tile loop widens the tile to the page and
    gives each slice one key group, each folding its own group's scales into
    the query (the shared tile stops at one group a tile)."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=G, value_group_size=D,
                       residual_tokens=16)
    batch = DecodeBatch(cfg, lens_for(cfg), H=2, D=D, rep=4, block_size=bs, seed=G + D)
    consts = layout_constexprs(batch.layout)
    bn, wt = decode_tiles_and_slices(batch.layout, consts, 128, warp_tiles)
    assert bn == min(128, bs) > G and bn // wt == min(bn // warp_tiles, G), (bn, wt)
    assert decode_tiles(batch.layout) == G
    check(batch, warp_tiles=warp_tiles)


def test_small_key_groups_keep_the_shared_tile_where_values_are_not_folded():
    """KIVI's own split (32 channels a value group) stays on the shared tile."""
    layout = PageLayout(KvcompConfig(k_bits=2, v_bits=2, group_size=32), 128, 128)
    assert decode_tiles_and_slices(layout, layout_constexprs(layout), 128, 2) == (32, 1)


def test_default_launch():
    """Warp tiles with 2 warps and 2 stages where they apply (measured, H200,
    2026-11-30); the caller's values win; 16-bit pages keep 4 warps, 3 stages."""
    q = KvcompConfig(k_bits=4, v_bits=4)
    assert DEFAULT_LAUNCH == {"block_n": 128, "num_warps": 2, "num_stages": 2, "warp_tiles": 2}
    assert decode_warps_stages(q, None, None) == (2, 2)
    assert decode_warps_stages(q, 8, 3) == (8, 3)
    assert decode_warps_stages(KvcompConfig(k_bits=16, v_bits=16), None, None) == (4, 3)


def test_warp_tiles_fall_back_where_not_folded():
    """Layouts the batched loop does not cover keep the shared tile; a tile
    never gets slices below the 16 tokens of the smallest dot."""
    def wt(cfg, block_size, want, D=64):
        layout = PageLayout(cfg, block_size, D)
        return decode_warp_tiles(cfg, layout_constexprs(layout), decode_tiles(layout), want)

    assert wt(KvcompConfig(group_size=64), 64, 4) == 4
    assert wt(KvcompConfig(group_size=64), 64, 8) == 4       # 16-token slices at most
    assert wt(KvcompConfig(group_size=32), 32, 4, D=32) == 2
    # value rows in two channel groups are not folded
    assert wt(KvcompConfig(group_size=32), 32, 4) == 1
    assert wt(KvcompConfig(k_bits=16, v_bits=16, group_size=64), 64, 4) == 1
    assert wt(KvcompConfig(k_bits=4, v_bits=16, group_size=64), 64, 4) == 1
    # per-token keys in two channel groups are not folded
    assert wt(KvcompConfig(key_axis="token", group_size=32), 64, 4) == 1
    with pytest.raises(ValueError, match="power of two"):
        wt(KvcompConfig(group_size=64), 64, 3)
    # a fallback case still computes the right thing
    cfg = KvcompConfig(k_bits=4, v_bits=4, group_size=32, residual_tokens=16, key_axis="token")
    check(DecodeBatch(cfg, lens_for(cfg), block_size=64, seed=22), splits=(2,), warp_tiles=4)


# ---------------------------------------------------------------- start-up check
# The backend checks its decode launch on the GPU before serving
# (check_decode_launch); here the same check runs under the interpreter, with
# the kernel wrapped so that a chosen launch returns wrong output.

import vllm_kvcomp.kernels.decode_launch as decode_launch
import vllm_kvcomp.kernels.triton_decode as triton_decode

SMALL = KvcompConfig(k_bits=4, v_bits=4, group_size=32, residual_tokens=16)


def _corrupting(monkeypatch, bad):
    calls = []
    real = triton_decode.kvcomp_decode_attention

    def wrapped(*args, **kw):
        calls.append(kw.get("warp_tiles"))
        out = real(*args, **kw)
        return out + 1.0 if bad(kw) else out

    monkeypatch.setattr(triton_decode, "kvcomp_decode_attention", wrapped)
    monkeypatch.setattr(decode_launch, "_CHECKED_LAUNCHES", {})
    return calls


def _check(launch):
    # on DEVICE: a GPU where there is one (the interpreter only runs without one)
    return decode_launch.check_decode_launch(SMALL, 32, 64, torch.float32, 4, DEVICE,
                                             launch=launch, check_on_cpu=True)


def test_startup_check_keeps_a_correct_launch(monkeypatch):
    calls = _corrupting(monkeypatch, lambda kw: False)
    assert _check(DEFAULT_LAUNCH) == DEFAULT_LAUNCH
    assert calls == [2, 2]  # one split and three
    _check(DEFAULT_LAUNCH)  # checked once a process
    assert len(calls) == 2


def test_startup_check_runs_a_named_split_count_alone(monkeypatch):
    """A launch that names its split count (one for every step) is checked
    with that count, not with one split and three, and served with it."""
    splits = []
    real = triton_decode.kvcomp_decode_attention

    def wrapped(*args, **kw):
        splits.append(kw.get("num_splits"))
        out = real(*args, **kw)
        return out + 1.0 if kw.get("num_splits") != 2 else out

    monkeypatch.setattr(triton_decode, "kvcomp_decode_attention", wrapped)
    monkeypatch.setattr(decode_launch, "_CHECKED_LAUNCHES", {})
    launch = {**DEFAULT_LAUNCH, "num_splits": 2}
    assert _check(launch) == launch
    assert splits == [2]
    # the same count that the check's reference disagrees with is refused
    monkeypatch.setattr(decode_launch, "_CHECKED_LAUNCHES", {})
    with pytest.raises(RuntimeError, match="Refusing to serve wrong attention"):
        _check({**DEFAULT_LAUNCH, "num_splits": 3})


def test_startup_check_falls_back_to_the_shared_tile(monkeypatch, caplog):
    calls = _corrupting(monkeypatch, lambda kw: kw.get("warp_tiles") != 1)
    assert _check(DEFAULT_LAUNCH) == {**DEFAULT_LAUNCH, "warp_tiles": 1}
    assert calls == [2, 2, 1, 1]
    assert "serving with the shared tile" in caplog.text


def test_startup_check_refuses_a_wrong_kernel(monkeypatch):
    _corrupting(monkeypatch, lambda kw: True)
    with pytest.raises(RuntimeError, match="Refusing to serve wrong attention"):
        _check(DEFAULT_LAUNCH)


def test_startup_check_names_a_launch_that_does_not_compile(monkeypatch):
    """A head too small for the key bits' tensor-core dots fails to compile
    on a GPU (the interpreter does not check dot shapes): the check refuses
    with the bits and head size named, not Triton's traceback."""
    from triton.compiler.errors import CompilationError

    def does_not_compile(*args, **kw):
        raise CompilationError("src", None, "Input shapes should have M >= 1, N >= 1 and "
                                            "K >= 16")

    monkeypatch.setattr(triton_decode, "kvcomp_decode_attention", does_not_compile)
    monkeypatch.setattr(decode_launch, "_CHECKED_LAUNCHES", {})
    with pytest.raises(RuntimeError, match=r"does not compile .* k_bits=4, v_bits=4.*"
                                           r"head_size 64.*K >= 16"):
        _check(DEFAULT_LAUNCH)


def test_startup_check_is_skipped_on_cpu(monkeypatch):
    calls = _corrupting(monkeypatch, lambda kw: True)
    launch = decode_launch.check_decode_launch(SMALL, 32, 64, torch.float32, 4, "cpu")
    assert launch == decode_launch.DECODE_LAUNCH and calls == []


# ------------------------------------------------------- fp8 window (residual_dtype)

FP8_CASES = [((4, 4), "channel", 64, 4, torch.bfloat16), ((2, 2), "channel", 128, 8, torch.float16),
             ((4, 2), "token", 64, 1, torch.float32), ((16, 16), "channel", 64, 2, torch.bfloat16)]


@pytest.mark.parametrize("bits,axis,D,rep,dtype", FP8_CASES,
                         ids=["k4v4-bf16-rep4", "k2v2-d128-fp16-rep8", "k4v2-token-fp32-rep1",
                              "k16v16-bf16-rep2"])
def test_fp8_window(bits, axis, D, rep, dtype):
    """residual_dtype="fp8_e4m3": the window's pages hold e4m3 (the history
    rounded as the backend rounds new K/V), the kernel reads them back in the
    model dtype; lengths off the group and block sizes, one or several
    splits, GQA."""
    cfg = KvcompConfig(k_bits=bits[0], v_bits=bits[1], group_size=16, residual_tokens=16,
                       key_axis=axis, residual_dtype="fp8_e4m3")
    b = DecodeBatch(cfg, [1, 19, 45, 77, 130], D=D, rep=rep, dtype=dtype, seed=41,
                    pad_residual=True)
    assert b.residual.dtype == torch.float8_e4m3fn
    check(b)


def test_fp8_window_reads_what_a_model_dtype_window_would():
    """The fp8 window is read back exactly: reference and kernel give the same
    bits as with a model-dtype window holding the same (rounded) values."""
    from vllm_kvcomp.kernels.triton_decode import decode_attention_reference

    fp8 = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=16,
                       residual_dtype="fp8_e4m3")
    b = DecodeBatch(fp8, [3, 29, 70], D=64, rep=4, dtype=torch.bfloat16, seed=5)
    args = list(b.args(DEVICE))
    auto = KvcompConfig(k_bits=4, v_bits=4, group_size=16, residual_tokens=16)
    auto_args = list(args)
    auto_args[4] = args[4].to(torch.bfloat16)
    auto_args[8] = PageLayout(auto, b.layout.block_size, 64, 2)
    auto_args[9] = auto
    assert torch.equal(decode_attention_reference(*args), decode_attention_reference(*auto_args))
    out = kvcomp_decode_attention(*args, 70, num_splits=2)
    assert torch.equal(out, kvcomp_decode_attention(*auto_args, 70, num_splits=2))
