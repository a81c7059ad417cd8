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
])
def test_bad_settings_are_named(raw, msg):
    with pytest.raises(KvcompConfigError, match=msg):
        KvcompConfig.from_dict(raw)


@pytest.mark.parametrize("kb, vb, per_token", [(16, 16, 512), (8, 8, 264), (4, 4, 136), (2, 2, 72)])
def test_bytes_per_token_head(kb, vb, per_token):
    layout = PageLayout(KvcompConfig(k_bits=kb, v_bits=vb), 128, 128, 2)
    assert layout.head_page_bytes == 128 * per_token


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
