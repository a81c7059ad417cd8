"""Launch selection of the decode kernel (``triton_decode``) and its start-up
check.

The selection takes Python ints only (page format, head shape, batch size,
``max_seq_len``, the SM count), so it gives the same answer at capture and
replay of a CUDA graph: the launch measured fastest (``DEFAULT_LAUNCH``), the
tile and warp tiles a page format allows (``decode_tiles_and_slices``), the
split count (``decode_num_splits``) and how codes become dot operands
(``code_conversion``). ``check_decode_launch`` compares the serving launch
with the reference on the device once, before serving.
"""

from __future__ import annotations

import dataclasses

import functools
import logging
import math
import os

import torch
import triton

from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.kernels.decode_batch import TOL, DecodeBatch, lens_for
from vllm_kvcomp.launch_env import DECODE_LAUNCH_ENV, MAX_DECODE_SPLITS, parse_decode_launch
from vllm_kvcomp.layout import PageLayout


# The launch the backend runs with no KVCOMP_DECODE_LAUNCH, where warp tiles
# apply (benchmarks/pick_decode_launch.py compares sweeps against it). The
# shared tile of the quantized configs also ran fastest with 2 warps and 2
# stages in the same sweep; 16-bit pages keep the launch they were tuned with.
DEFAULT_LAUNCH = {"block_n": 128, "num_warps": 2, "num_stages": 2, "warp_tiles": 2}
SIXTEEN_BIT_LAUNCH = {"num_warps": 4, "num_stages": 3}

# How bf16 decode folds per-channel key scales into the query (see
# kvcomp_decode_attention's key_fold).
KEY_FOLD_DEFAULT = "fp16"

# Launch overrides for the serving path (the backend passes them on; the
# benchmarks name their own): KVCOMP_DECODE_LAUNCH, checked at start-up.
DECODE_LAUNCH = parse_decode_launch(os.environ.get(DECODE_LAUNCH_ENV, ""))


def decode_tiles(layout: PageLayout, block_n: int = 128, key_group_cap: bool = True) -> int:
    """BLOCK_N of the shared tile: packed tokens per inner step. A power of two
    <= ``block_n`` dividing the block size (tiles never straddle pages) and,
    for per-channel keys, <= group_size (a tile lies in one key group, so its
    scales fold into the query; ``key_group_cap=False`` drops this, see
    ``decode_tiles_and_slices``); at least 16 for ``tl.dot``."""
    cfg = layout.config
    bn = 1 << (max(block_n, 1).bit_length() - 1)
    while layout.block_size % bn:
        bn //= 2
    if key_group_cap and cfg.k_bits < 16 and cfg.key_axis == "channel" and cfg.group_size >= 16:
        bn = min(bn, cfg.group_size)
    if bn < 16:
        raise NotImplementedError(
            f"the Triton decode kernel needs a block size divisible by 16, "
            f"got {layout.block_size}")
    return bn


def decode_warp_tiles(cfg: KvcompConfig, consts: dict, block_n: int, warp_tiles: int) -> int:
    """Warp tiles the packed loop uses: up to ``warp_tiles`` (a power of two)
    slices of at least 16 tokens (the smallest dot) per tile, on the folded
    paths only (both sides quantized, keys per channel with a tile inside one
    group or per token in one channel group, values in one channel group);
    1 (one tile shared by all warps) elsewhere."""
    _check_warp_tiles(warp_tiles)
    warp_tiles = min(warp_tiles, max(1, block_n // 16))
    if warp_tiles == 1:
        return 1
    keys_folded = (block_n <= cfg.group_size if cfg.key_axis == "channel"
                   else consts["K_NG"] == 1)
    if not keys_folded or not _values_fold(cfg, consts):
        return 1
    return warp_tiles


def _check_warp_tiles(warp_tiles: int) -> None:
    if warp_tiles & (warp_tiles - 1) or warp_tiles < 1:
        raise ValueError(f"warp_tiles={warp_tiles}: must be a power of two")


def _values_fold(cfg: KvcompConfig, consts: dict) -> bool:
    """Both sides quantized and a token's values one channel group: what the
    warp-tile loop needs besides keys folded per slice."""
    return cfg.k_bits < 16 and cfg.v_bits < 16 and consts["V_NG"] == 1


def decode_tiles_and_slices(layout: PageLayout, consts: dict, block_n: int,
                            warp_tiles: int) -> tuple[int, int]:
    """(BLOCK_N, warp tiles) of the packed loop. Per-channel keys in key groups
    shorter than ``block_n`` (KIVI-2's 32 tokens) cap the shared tile at one
    group, which makes the loop pay its fixed cost per tile 4x as often. Warp
    tiles need only each slice in one group: there the tile widens to
    ``block_n`` with one slice per group at most (more slices than warps: each
    warp takes several), where values fold too (one channel group). Elsewhere
    ``decode_tiles`` and ``decode_warp_tiles``."""
    cfg = layout.config
    _check_warp_tiles(warp_tiles)
    bn = decode_tiles(layout, block_n)
    if warp_tiles > 1 and cfg.key_axis == "channel" and _values_fold(cfg, consts):
        wide = decode_tiles(layout, block_n, key_group_cap=False)
        ts = min(wide // warp_tiles, cfg.group_size)
        if wide > bn and ts >= 16:
            return wide, wide // ts
    return bn, decode_warp_tiles(cfg, consts, bn, warp_tiles)


def decode_warps_stages(cfg: KvcompConfig, num_warps: int | None,
                        num_stages: int | None) -> tuple[int, int]:
    """(num_warps, num_stages): the caller's, else the measured default of
    the config's pages (quantized or 16-bit)."""
    base = SIXTEEN_BIT_LAUNCH if cfg.k_bits == 16 and cfg.v_bits == 16 else DEFAULT_LAUNCH
    if num_warps is None:
        # more slices than warps: each warp takes several (4 slices on 2 or 4
        # warps ran within 5 % of each other, H200, 2026-11-30)
        num_warps = base["num_warps"]
    return num_warps, base["num_stages"] if num_stages is None else num_stages


def decode_num_splits(
    num_reqs: int,
    num_kv_heads: int,
    max_seq_len: int,
    cfg: KvcompConfig,
    block_n: int,
    num_sms: int = 132,
    programs_per_sm: int = 8,
    min_tiles_per_split: int = 2,
    max_splits: int = MAX_DECODE_SPLITS,
) -> int:
    """Splits per (request, KV head): enough programs to fill the GPU
    (``programs_per_sm`` per SM keeps several tile loads in flight per SM),
    but at least ``min_tiles_per_split`` tiles of work each (packed tiles plus
    the residual window), so the partial writes and the merge stay small next
    to the page reads. Python ints only: the same answer at capture and
    replay of a CUDA graph."""
    packed = cfg.quantized_prefix_len(max(max_seq_len - 1, 0))
    tiles = triton.cdiv(packed, block_n) + triton.cdiv(
        min(cfg.residual_window, max_seq_len) + 1, block_n)
    want = triton.cdiv(programs_per_sm * num_sms, max(1, num_reqs * num_kv_heads))
    cap = triton.cdiv(tiles, min_tiles_per_split)
    return max(1, min(want, cap, max_splits))


@functools.lru_cache(maxsize=None)
def device_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def code_conversion(bits: int, dtype: torch.dtype, ieee: bool) -> int:
    """How codes become dot operands: 0 exact int->float conversion; 1 the
    fp16 mantissa trick in Triton ops (``codes_operand``, 1024 + code; fp16
    models or IEEE fp32 dots, i.e. the CPU tests); 3 the mantissa trick in
    inline PTX (``unpack_asm``; GPU only, the default there: 128 + code for
    bf16, up to 4-bit codes, 1024 + code for fp16)."""
    if ieee or dtype not in (torch.float16, torch.bfloat16) or (
            bits >= 8 and dtype == torch.bfloat16):
        return 0
    return 3


def code_offset(cvt: int, dtype: torch.dtype) -> float:
    """The offset the mantissa trick adds to every code."""
    if cvt == 0:
        return 0.0
    if cvt == 1 or (cvt == 3 and dtype == torch.float16):
        return 1024.0
    return 128.0


# (cfg, block_size, head_size, dtype, rep, device) -> the launch that passed
_CHECKED_LAUNCHES: dict[tuple, dict] = {}


def check_decode_launch(cfg: KvcompConfig, block_size: int, head_size: int,
                        dtype: torch.dtype, rep: int, device: torch.device,
                        launch: dict | None = None, check_on_cpu: bool = False) -> dict:
    """The decode launch to serve with (``launch``, default ``DECODE_LAUNCH``),
    after one comparison on this GPU against
    ``triton_decode.decode_attention_reference`` on a small batch of this
    model's page format and head shape (``decode_batch.DecodeBatch``,
    ``decode_batch.TOL``), with one split and with three (a launch that names
    its split count: with that count). CI has no GPU and the interpreter runs only fp32 dots, so the
    16-bit tensor-core paths are otherwise checked only by the device runs of
    the kernel tests; a launch that fails here is replaced by the shared tile
    (``warp_tiles=1``) with a warning, and if that fails too the engine
    refuses to start: never silently wrong output. On CPU the launch is
    returned unchecked (the interpreter tests cover it) unless
    ``check_on_cpu`` (the tests of this check). Milliseconds a config and
    process; call it outside CUDA-graph capture."""
    launch = dict(DECODE_LAUNCH if launch is None else launch)
    device = torch.device(device)
    if device.type != "cuda" and not check_on_cpu:
        return launch
    if cfg.eviction is not None:
        # the launch is the same with or without the evicted ranges
        # (eviction_gpu), which the check's batch has none of
        cfg = dataclasses.replace(cfg, eviction=None)
    key = (cfg, block_size, head_size, dtype, rep, str(device), tuple(sorted(launch.items())))
    if key in _CHECKED_LAUNCHES:
        return _CHECKED_LAUNCHES[key]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "kvcomp: the decode launch must be checked before CUDA-graph capture "
            "(KvcompMetadataBuilder does it); this config was not")
    batch = DecodeBatch(cfg, lens_for(cfg), H=2, D=head_size, rep=rep, dtype=dtype,
                        block_size=block_size, seed=7)
    ref = batch.reference().float()

    compile_errors = []

    def error(kw) -> float:
        worst = 0.0
        kw = dict(kw)
        # a launch that names its split count serves with that count alone
        for splits in ((kw.pop("num_splits"),) if "num_splits" in kw else (1, 3)):
            try:
                out = batch.triton(num_splits=splits, device=device, **kw).float()
            except triton.CompilationError as e:
                # e.g. a head too small for the tensor-core dots of the key bits'
                # phases: a start-up refusal that names it, not a traceback
                compile_errors.append(str(e).strip().splitlines()[-1])
                return math.inf
            # scaled like assert_close(atol=rtol=tol): <= 1 passes
            err = (out - ref).abs() / (TOL[dtype] * (1 + ref.abs()))
            worst = max(worst, float(err.max()) if torch.isfinite(out).all() else math.inf)
        return worst

    tried = [launch]
    if launch.get("warp_tiles", DEFAULT_LAUNCH["warp_tiles"]) != 1:
        tried.append({**launch, "warp_tiles": 1})
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    errors = []
    for kw in tried:
        errors.append(error(kw))
        if errors[-1] <= 1:
            if kw is not launch:
                logging.getLogger("vllm_kvcomp").warning(
                    "kvcomp: the decode launch %s disagrees with the reference on %s "
                    "(%s, head_size %d, %d query heads a KV head; error %.3g of the "
                    "tolerance): serving with the shared tile %s instead",
                    launch, where, dtype, head_size, rep, errors[0], kw)
            _CHECKED_LAUNCHES[key] = kw
            return kw
    if compile_errors:
        raise RuntimeError(
            f"kvcomp: the decode kernel does not compile on {where} for k_bits={cfg.k_bits}, "
            f"v_bits={cfg.v_bits}, key_axis={cfg.key_axis!r} with head_size {head_size} "
            f"({dtype}, {rep} query heads a KV head): {compile_errors[-1]}. Choose other "
            "bits (2-bit keys need head_size >= 64 on a GPU) or another attention backend.")
    raise RuntimeError(
        f"kvcomp: the decode kernel disagrees with its reference on "
        f"{where} for {cfg} ({dtype}, head_size {head_size}, "
        f"{rep} query heads a KV head): launches {tried}, errors {errors} of the tolerance. "
        f"Refusing to serve wrong attention; please report this.")
