"""Page sizes against vLLM's own allocator, and the capacity it reports.

Runs vLLM's ``get_kv_cache_configs`` / ``get_kv_cache_capacity`` (the code
behind the "GPU KV cache size: N tokens" log line) on our specs, in process,
without starting an engine.
"""
import pytest
import torch

import vllm_kvcomp
from sim_paged import CAPACITY_SHAPES, reported_tokens, shape_specs
from vllm_kvcomp.config import KvcompConfig
from vllm_kvcomp.layout import PageLayout
from vllm_kvcomp.residual_layer import packed_spec, residual_spec
from vllm_kvcomp.tiny_model import make_tiny_llama

NUM_LAYERS, KV_HEADS, HEAD = 4, 2, 128
MEMORY = 1 << 30


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    vllm_kvcomp.register()
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _vllm_config(model, max_model_len):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, max_model_len=max_model_len, block_size=128,
                      max_num_batched_tokens=8192).create_engine_config()


def _allocate(vc, specs):
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity, get_kv_cache_configs

    config = get_kv_cache_configs(vc, [specs], [MEMORY])[0]
    tokens, _ = get_kv_cache_capacity(vc, config)
    return config, tokens


def _bf16_tokens(vc):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    spec = FullAttentionSpec(block_size=128, num_kv_heads=KV_HEADS, head_size=HEAD,
                             dtype=torch.bfloat16)
    return _allocate(vc, {f"layer.{i}": spec for i in range(NUM_LAYERS)})[1]


def _kvcomp_specs(cfg):
    packed = packed_spec(cfg, 128, KV_HEADS, HEAD, torch.bfloat16)
    residual = residual_spec(packed)
    specs = {}
    for i in range(NUM_LAYERS):
        specs[f"layer.{i}"] = packed
        if cfg.needs_residual_cache:
            specs[f"layer.{i}.kvcomp_residual"] = residual
    return specs


def _by_position(bits: int, **kw) -> KvcompConfig:
    """``bits`` with 128-token groups and the window by position in the model
    dtype (k4v4's and k2v2's defaults hold it as a ring)."""
    return KvcompConfig(k_bits=bits, v_bits=bits, **{
        "group_size": 128, "residual_ring": False, "residual_dtype": "auto", **kw})


@pytest.mark.parametrize("bits", [16, 8, 4, 2])
def test_allocator_uses_the_packed_page_size(model, bits):
    cfg = _by_position(bits)
    vc = _vllm_config(model, 32768)
    config, _ = _allocate(vc, _kvcomp_specs(cfg))
    page = PageLayout(cfg, 128, HEAD, 2).page_bytes(KV_HEADS)
    groups = {type(g.kv_cache_spec).__name__: g for g in config.kv_cache_groups}
    assert groups["KvcompSpec"].kv_cache_spec.page_size_bytes == page
    if cfg.needs_residual_cache:
        # The residual group shares the pool: same (padded) page size, and
        # its real full-precision page fits inside.
        res = groups["KvcompResidualSpec"].kv_cache_spec
        assert res.page_size_bytes == page
        assert res.real_page_size_bytes <= page
    # One tensor per layer slot, each exactly num_blocks pages, within budget.
    assert all(t.size == config.num_blocks * page for t in config.kv_cache_tensors)
    assert sum(t.size for t in config.kv_cache_tensors) <= MEMORY


# The window by position: vLLM-reported capacity >= 3.5x bf16 at k4v4 and >= 6x
# at k2v2 from 32K. The residual window (128 + 128 tokens at full precision, counted at
# its two-window peak) costs as much as the packed pages of a 4K request, so
# the bars hold from 32K context up (long-context serving is what this is
# for); at 4K the same pool gives 2.56x / 3.61x since packed pages are held
# for Q(n) tokens only (2.4x / 3.4x before; the floors below).
@pytest.mark.parametrize("max_model_len, k4_floor, k2_floor", [
    (4096, 2.3, 3.3), (32768, 3.5, 6.0), (65536, 3.5, 6.0)])
def test_reported_capacity_vs_bf16(model, max_model_len, k4_floor, k2_floor):
    vc = _vllm_config(model, max_model_len)
    bf16 = _bf16_tokens(vc)
    k4 = _allocate(vc, _kvcomp_specs(_by_position(4)))[1]
    k2 = _allocate(vc, _kvcomp_specs(_by_position(2)))[1]
    print(max_model_len, bf16, k4, k2, k4 / bf16, k2 / bf16)
    assert k4 / bf16 >= k4_floor
    assert k2 / bf16 >= k2_floor
    # And never above the pure packed ratio (the window is not free).
    assert k4 / bf16 < 512 / 136 and k2 / bf16 < 512 / 72


@pytest.mark.parametrize("shape", list(CAPACITY_SHAPES))
def test_fp8_ring_window_capacity_at_4096(model, shape):
    """The capacity bar at max_model_len 4096 (k4v4 >= 3.4x bf16, k2v2 >=
    5.5x), reported by vLLM's ``get_kv_cache_capacity`` with async
    scheduling's two unsettled steps: one ring of window pages per request
    (``residual_ring``) holding float8 e4m3 (``residual_dtype``), so a page
    holds twice the window's tokens. Measured: k4v4 3.54x, k2v2 5.83x (both
    shapes), against 3.35x / 4.84x with the ring in bf16."""
    layers, heads, memory = CAPACITY_SHAPES[shape]
    vc = _vllm_config(model, 4096)

    def tokens(specs):
        return reported_tokens(vc, specs, memory)

    bf16 = tokens(shape_specs(None, layers, heads, 2))
    ratio = {}
    for bits in (4, 2):
        for dtype in ("auto", "fp8_e4m3"):
            cfg = _by_position(bits, residual_ring=True, residual_dtype=dtype)
            ratio[bits, dtype] = tokens(shape_specs(cfg, layers, heads, 2)) / bf16
    print(shape, {k: round(v, 3) for k, v in ratio.items()})
    assert ratio[4, "fp8_e4m3"] >= 3.4 and ratio[2, "fp8_e4m3"] >= 5.5
    # the bf16 ring misses the bar: the half-size window is what makes it
    assert ratio[4, "auto"] < 3.4 and ratio[2, "auto"] < 5.5
    assert ratio[4, "fp8_e4m3"] < 512 / 136 and ratio[2, "fp8_e4m3"] < 512 / 72


def test_fp8_window_pages_hold_e4m3():
    """The window's spec holds float8 e4m3 pages of twice the tokens, padded
    to the same packed page (both groups share one pool); "auto" is the
    model dtype, unchanged."""
    for bits in (4, 2):
        auto = residual_spec(packed_spec(_by_position(bits), 128, KV_HEADS, HEAD,
                                         torch.bfloat16))
        fp8 = residual_spec(packed_spec(_by_position(bits, residual_dtype="fp8_e4m3"), 128,
                                        KV_HEADS, HEAD, torch.bfloat16))
        assert auto.dtype == torch.bfloat16 and fp8.dtype == torch.float8_e4m3fn
        assert fp8.block_size == 2 * auto.block_size
        assert fp8.page_size_bytes == auto.page_size_bytes


@pytest.mark.parametrize("shape", list(CAPACITY_SHAPES))
def test_default_window_capacity_at_4096(model, shape):
    """The capacity bar with the defaults (k4v4: 64-token key groups, one
    value group a head, a 0..63-token ring; k2v2: a 160..287-token e4m3
    ring), as vLLM's ``get_kv_cache_capacity`` reports it at max_model_len
    4096 with two unsettled steps: k4v4 >= 3.4x bf16 (3.44x), k2v2 >= 5.5x
    (5.83x); the same bits with the window by position stay below."""
    layers, heads, memory = CAPACITY_SHAPES[shape]
    vc = _vllm_config(model, 4096)

    def ratio(cfg):
        return (reported_tokens(vc, shape_specs(cfg, layers, heads, 2), memory) /
                reported_tokens(vc, shape_specs(None, layers, heads, 2), memory))

    k4, k2 = ratio(KvcompConfig(k_bits=4, v_bits=4)), ratio(KvcompConfig(k_bits=2, v_bits=2))
    print(shape, round(k4, 3), round(k2, 3))
    assert k4 >= 3.4 and k2 >= 5.5
    assert k4 < 512 / 140 and k2 < 512 / 72
    assert ratio(_by_position(4)) < 3.0 and ratio(_by_position(2)) < 3.0


def test_default_window_logged_capacity_at_4096(tiny_llama):
    """The "GPU KV cache size" vLLM logs for the CPU demo's tiny Llama (bf16, 1
    GiB of KV, max_model_len 4096, 128-token pages) with the default window
    settings, against upstream's bf16 cache (CPU_ATTN): the capacity bar,
    k4v4 >= 3.4x and k2v2 >= 5.5x (an H200 logged 3.44x and 5.83x for the
    Llama-3.1-8B shape)."""
    from e2e_util import logged_kv_tokens

    bf16, k4, k2 = logged_kv_tokens(tiny_llama, {"k_bits": 4, "v_bits": 4},
                                    {"k_bits": 2, "v_bits": 2})
    print("logged", bf16, k4, k2, k4 / bf16, k2 / bf16)
    assert k4 / bf16 >= 3.4 and k2 / bf16 >= 5.5


def test_k4v2_with_its_window_as_a_ring_holds_more_than_the_k4v4_default(tiny_llama):
    """The README's setting for more room than k4v4 (4-bit keys, 2-bit values in 32-token
    groups, KIVI's 128..159-token window held as a ring) holds more tokens at max_model_len
    4096 than the k4v4 default, on both shapes (``quality.capacity``, the tool its numbers
    come from); by position it holds fewer."""
    from quality.capacity import capacity_of, capacity_rows

    rows = {r["setting"]: r for r in capacity_rows(
        ["kvcomp_k4v2_r128_channel_g32_ring", "kvcomp_k4v2_r128_channel_g32"], 4096,
        model=tiny_llama)}
    ring = rows["kvcomp_k4v2_r128_channel_g32_ring"]
    by_position = rows["kvcomp_k4v2_r128_channel_g32"]
    vc = _vllm_config(tiny_llama, 4096)
    bf16, k4v4 = capacity_of(vc, None), capacity_of(vc, KvcompConfig(k_bits=4, v_bits=4))
    for shape in CAPACITY_SHAPES:
        default = k4v4[shape] / bf16[shape]
        assert ring[f"{shape}_x"] == pytest.approx(3.556, abs=1e-3)
        assert ring[f"{shape}_x"] > default + 0.1
        assert by_position[f"{shape}_x"] < 3.0
