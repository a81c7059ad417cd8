import pytest

from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.layout import PageLayout


@pytest.mark.parametrize("raw, msg", [
    ({"k_bits": 3}, "k_bits=3"),
    ({"v_bits": 32}, "v_bits=32"),
    ({"bogus": 1}, "unknown kvcomp setting"),
    ({"group_size": 48}, "group_size=48"),
    ({"residual_tokens": -1}, "residual_tokens=-1"),
    ({"key_axis": "head"}, "key_axis='head'"),
    ({"value_axis": "channel"}, "value_axis='channel'"),
    ({"block_size": 96}, "multiple of group_size"),
    ({"fresh_prefill": "flashinfer"}, "fresh_prefill='flashinfer'"),
    ({"value_group_size": 24}, "value_group_size=24"),
    ({"value_group_size": True}, "value_group_size=True"),
    ({"residual_dtype": "fp8"}, "residual_dtype='fp8'"),
    ({"residual_dtype": "float8_e4m3fn"}, "residual_dtype='float8_e4m3fn'"),
    ({"residual_dtype": "bfloat16"}, "residual_dtype='bfloat16'"),
    ({"residual_dtype": 8}, "residual_dtype=8 must be str"),
    ({"residual_dtype": 1.0}, "residual_dtype=1.0 must be str"),
    ({"residual_ring": "yes"}, "residual_ring='yes' must be bool"),
])
def test_bad_settings_are_named(raw, msg):
    with pytest.raises(KvcompConfigError, match=msg):
        KvcompConfig.from_dict(raw)


@pytest.mark.parametrize("kb, vb, per_token", [(16, 16, 512), (8, 8, 264), (4, 4, 136), (2, 2, 72)])
def test_bytes_per_token_head(kb, vb, per_token):
    layout = PageLayout(KvcompConfig(k_bits=kb, v_bits=vb, group_size=128), 128, 128, 2)
    assert layout.head_page_bytes == 128 * per_token


def test_layout_defaults_follow_the_bits_and_policies(tmp_path):
    """k4v4 and k2v2 naming no packing or window setting get the capacity-bar
    layouts: k4v4 64-token key groups, one value group a head (140 bytes a
    token and head), a ring of 0..63 model-dtype tokens; k2v2 a
    160..287-token e4m3 ring. Other bits, settings naming any of these, and
    any with a head map, eviction or Quest start from 128-token groups and
    the window by position. Null means unset."""
    def layout(**kw):
        c = KvcompConfig.from_dict(kw)
        return (c.group_size, c.value_group_size, c.residual_tokens, c.residual_ring,
                c.residual_dtype)

    assert layout() == layout(k_bits=4, v_bits=4) == (64, 128, 0, True, "auto")
    assert PageLayout(KvcompConfig(), 128, 128, 2).head_page_bytes == 128 * 140
    assert layout(k_bits=2, v_bits=2) == (128, None, 160, True, "fp8_e4m3")
    assert layout(group_size=None, residual_ring=None, residual_tokens=None) == layout()
    assert layout(group_size=32) == (32, None, 0, False, "auto")
    assert layout(residual_ring=True) == (128, None, 0, True, "auto")
    assert layout(residual_tokens=32) == (128, None, 32, False, "auto")
    assert layout(k_bits=2, v_bits=2, residual_dtype="auto") == (128, None, 128, False, "auto")
    assert layout(k_bits=2, v_bits=2, residual_ring=True) == (128, None, 128, True, "auto")
    for bits in (16, 8):
        assert layout(k_bits=bits, v_bits=bits) == (128, None, 0, False, "auto")
    assert layout(k_bits=4, v_bits=2) == (128, None, 128, False, "auto")
    assert layout(key_axis="token") == (128, None, 0, False, "auto")
    head_map = tmp_path / "map.json"
    head_map.write_text("{}")
    for policy in ({"eviction": {"method": "snapkv", "budget_tokens": 512}},
                   {"quest": {"budget_tokens": 512}}, {"head_map": str(head_map)}):
        assert layout(**policy) == (128, None, 0, False, "auto"), policy
        assert layout(k_bits=2, v_bits=2, **policy) == (128, None, 128, False, "auto"), policy


def test_value_groups_apart_from_key_groups():
    """value_group_size sets the channels per value group alone (None: group_size,
    as KIVI): keys keep 32-token groups, values one group per head."""
    kivi = PageLayout(KvcompConfig(k_bits=2, v_bits=2, group_size=32), 128, 128, 2)
    wide = PageLayout(KvcompConfig(k_bits=2, v_bits=2, group_size=32, value_group_size=128),
                      128, 128, 2)
    assert kivi.k_param_shape == wide.k_param_shape == (4, 128)
    assert kivi.v_param_shape == (128, 4) and wide.v_param_shape == (128, 1)
    # 4 fewer bytes of value params per token than 4 groups' 16
    assert kivi.head_page_bytes - wide.head_page_bytes == 128 * 12


def test_fp8_window_setting(tmp_path):
    """residual_dtype: the model dtype by default; e4m3 where there is a
    window, nothing without one; with a head map, the retrieval heads'
    window."""
    assert KvcompConfig().residual_dtype == "auto" and not KvcompConfig().residual_fp8
    assert KvcompConfig(k_bits=2, v_bits=2).residual_fp8
    cfg = KvcompConfig.from_dict({"residual_dtype": "fp8_e4m3", "residual_ring": True})
    assert cfg.residual_fp8
    assert PageLayout(cfg, 128, 128, 2).residual_dtype_bytes == 1
    assert PageLayout(KvcompConfig(), 128, 128, 2).residual_dtype_bytes == 2
    no_window = KvcompConfig.from_dict({"k_bits": 16, "v_bits": 16,
                                        "residual_dtype": "fp8_e4m3"})
    assert not no_window.needs_residual_cache and not no_window.residual_fp8
    head_map = tmp_path / "map.json"
    head_map.write_text("{}")
    with_map = KvcompConfig.from_dict({"residual_dtype": "fp8_e4m3", "head_map": str(head_map)})
    assert with_map.residual_fp8


def test_round_to_window_is_e4m3_saturating():
    """New K/V as the fp8 window holds them: torch's own e4m3 rounding,
    saturating at +-448 where torch would give NaN; unchanged with "auto"."""
    import torch

    from vllm_kvcomp.kernels.packing import round_to_window, to_window

    x = torch.tensor([0.1, -3.3, 31.125, 447.0, 500.0, -1e4, 0.0], dtype=torch.bfloat16)
    cfg = KvcompConfig(residual_dtype="fp8_e4m3")
    r = round_to_window(x, cfg)
    assert r.dtype == torch.bfloat16
    assert r.tolist() == [0.1015625, -3.25, 32.0, 448.0, 448.0, -448.0, 0.0]
    assert torch.equal(round_to_window(r, cfg), r)
    assert torch.equal(to_window(r, torch.float8_e4m3fn).to(torch.bfloat16), r)
    assert round_to_window(x, KvcompConfig()) is x
