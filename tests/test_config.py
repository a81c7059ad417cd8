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
])
def test_bad_settings_are_named(raw, msg):
    with pytest.raises(KvcompConfigError, match=msg):
        KvcompConfig.from_dict(raw)


@pytest.mark.parametrize("kb, vb, per_token", [(16, 16, 512), (8, 8, 264), (4, 4, 136), (2, 2, 72)])
def test_bytes_per_token_head(kb, vb, per_token):
    layout = PageLayout(KvcompConfig(k_bits=kb, v_bits=vb), 128, 128, 2)
    assert layout.head_page_bytes == 128 * per_token
