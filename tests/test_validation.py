"""Every start-up refusal, checked through vLLM's own config path (vLLM
wraps our KvcompConfigError, a ValueError, in its pydantic ValidationError,
also a ValueError, keeping our message).

``EngineArgs.create_engine_config()`` is what ``LLM(...)`` and ``vllm serve``
run in process 0 before any engine process or KV memory exists; our checks
hook into it (``patches/platform_hooks.py``), so these tests need no engine.
"""
import pytest

import vllm_kvcomp
from e2e_util import engine_config, model_variant
from vllm_kvcomp.config import KvcompConfigError
from vllm_kvcomp.tiny_model import make_tiny_llama


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    vllm_kvcomp.register()
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.mark.parametrize("kvcomp, message", [
    ({"k_bits": 3}, "k_bits=3"),
    ({"v_bits": 1}, "v_bits=1"),
    ({"k_bitz": 4}, "unknown kvcomp setting"),
    ({"group_size": 100}, "group_size=100"),
    ({"residual_tokens": "many"}, "residual_tokens"),
    ({"value_group_size": 12}, "value_group_size=12"),
    ({"k_bits": 4.0}, "k_bits=4.0 must be int, not float"),
    ({"v_bits": "4"}, "v_bits='4' must be int, not str"),
    ({"residual_tokens": True}, "residual_tokens=True must be int or null, not bool"),
    ({"group_size": 128.0}, "group_size=128.0 must be int"),
    ({"key_axis": 1}, "key_axis=1 must be str"),
    ({"block_size": "128"}, "block_size='128' must be int or null"),
])
def test_bad_settings_fail_at_startup(llama, kvcomp, message):
    with pytest.raises(ValueError, match=message):
        engine_config(llama, kvcomp)


@pytest.mark.parametrize("var, bad, message, good", [
    ("KVCOMP_PREFILL_LAUNCH", "block_rows=100", "block_rows must be a power",
     "block_rows=128,num_stages=3"),
    ("KVCOMP_DECODE_LAUNCH", "warp_tiles=3", "warp_tiles must be a power",
     "warp_tiles=2,num_warps=2"),
    ("KVCOMP_EVICTION_GRAPHS", "yes", r"expected 1 \(on\) or 0 \(off\), got 'yes'", "1"),
    ("KVCOMP_SCORE_KERNEL", "true", "expected 1", "0"),
    ("KVCOMP_FORCE_TRITON", "2", "expected 1", "0"),
])
def test_bad_launch_env_fails_at_startup(llama, monkeypatch, var, bad, message, good):
    monkeypatch.setenv(var, bad)
    with pytest.raises(ValueError, match=f"{var}: {message}"):
        engine_config(llama)
    monkeypatch.setenv(var, good)
    engine_config(llama)


def test_switches_read_their_defaults_and_values(monkeypatch):
    from vllm_kvcomp.launch_env import SWITCH_DEFAULTS, switch, switch_named

    # on: what has run on a GPU and is served by default; off: references and opt-ins
    assert SWITCH_DEFAULTS == {
        "KVCOMP_FORCE_TRITON": False, "KVCOMP_STORE_SPLIT": False,
        "KVCOMP_EVICTION_GPU": False, "KVCOMP_EVICTION_ROWS": True,
        "KVCOMP_SCORE_KERNEL": True, "KVCOMP_EVICTION_BATCH": True,
        "KVCOMP_EVICTION_GRAPHS": True, "KVCOMP_SELECT_KERNEL": True,
        "KVCOMP_SCORE_FROM_LOGITS": True, "KVCOMP_DECODE_ROWS_KERNEL": True}

    for var, default in SWITCH_DEFAULTS.items():
        monkeypatch.delenv(var, raising=False)
        assert switch(var) is default and not switch_named(var), var
        monkeypatch.setenv(var, " ")
        assert switch(var) is default and not switch_named(var), var
        for value, on in (("1", True), ("0", False)):
            monkeypatch.setenv(var, value)
            assert switch(var) is on and switch_named(var), (var, value)


@pytest.mark.parametrize("kvcomp", [{"k_bits": 4}, {"k_bits": 3}, {}])
def test_settings_without_the_backend_fail_at_startup(llama, kvcomp):
    """kvcomp settings (valid or not) with vLLM's default backend: an error
    naming both, never a silent uncompressed run."""
    from vllm.engine.arg_utils import EngineArgs

    args = EngineArgs(model=llama, max_model_len=2048, additional_config={"kvcomp": kvcomp})
    with pytest.raises(ValueError, match="add --attention-backend kvcomp"):
        args.create_engine_config()
    EngineArgs(model=llama, max_model_len=2048).create_engine_config()  # no settings: fine


def test_startup_logs_settings_and_capacity(llama, caplog):
    """One info line at start-up: the backend, every resolved setting, the
    block size and the capacity against the model dtype, which must match
    what the specs charge per max_model_len request."""
    import logging

    from vllm_kvcomp.config import KvcompConfig
    from vllm_kvcomp.residual_layer import packed_spec, residual_spec

    logging.getLogger("vllm.kvcomp").addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="vllm.kvcomp"):
        vc = engine_config(llama, {"k_bits": 4, "v_bits": 4})
    line = next(r.getMessage() for r in caplog.records if "KVCOMP attention backend" in r.getMessage())
    for part in ("k_bits=4", "v_bits=4", "group_size=128", "residual_tokens=0",
                 f"block_size={vc.cache_config.block_size}", "prompt_attention=as_stored",
                 "max_model_len 2048"):
        assert part in line, line
    assert "None" not in line and "auto" not in line, line
    mc = vc.model_config
    heads, head = mc.get_num_kv_heads(vc.parallel_config), mc.get_head_size()
    p = packed_spec(KvcompConfig(), vc.cache_config.block_size, heads, head, mc.dtype)
    r = residual_spec(p, vc.max_concurrent_batches)
    used = (-(-p.packed_tokens(2048) // p.block_size) * p.page_size_bytes
            + r.max_admission_blocks_per_request(0, 2048) * r.page_size_bytes)
    ratio = 2048 * 2 * heads * head * mc.dtype.itemsize / used
    assert f"{ratio:.2f}x" in line, (line, ratio)


@pytest.mark.parametrize("kvcomp, reason", [
    ({"k_bits": 4, "v_bits": 4}, None),
    ({"k_bits": 4, "v_bits": 4, "eviction": {"method": "snapkv", "budget_tokens": 512}},
     "no hits (eviction snapkv drops or moves"),
    ({"k_bits": 2, "v_bits": 2}, "no hits (the window ring always holds at least 160 tokens"),
    ({"k_bits": 2, "v_bits": 2, "residual_ring": False}, None),
])
def test_startup_names_settings_that_get_no_prefix_hits(llama, caplog, kvcomp, reason):
    import logging

    logging.getLogger("vllm.kvcomp").addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="vllm.kvcomp"):
        engine_config(llama, kvcomp, enable_prefix_caching=True)
    line = next(r.getMessage() for r in caplog.records
                if "KVCOMP attention backend" in r.getMessage())
    if reason is None:
        assert "prefix_caching" not in line, line
    else:
        assert f"prefix_caching={reason}" in line, line


def test_good_settings_pass_and_set_block_size(llama):
    vc = engine_config(llama, {"k_bits": 2, "v_bits": 4, "group_size": 64})
    assert vc.cache_config.block_size % 64 == 0


@pytest.mark.parametrize("kwargs, message", [
    (dict(kv_cache_dtype="fp8"), "kv-cache-dtype fp8"),
    (dict(speculative_config={"method": "ngram", "num_speculative_tokens": 2,
                              "prompt_lookup_max": 3}), "speculative decoding"),
    (dict(block_size=96), "block-size 96"),
])
def test_unsupported_engine_options_are_named(llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        engine_config(llama, **kwargs)


@pytest.mark.parametrize("changes, message", [
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64),
     "sliding-window attention"),
    (dict(architectures=["Gemma2ForCausalLM"], model_type="gemma2", sliding_window=64,
          query_pre_attn_scalar=128), "sliding-window|gemma2"),
])
def test_unsupported_models_are_named(llama, tmp_path, changes, message):
    with pytest.raises(ValueError, match=message):
        engine_config(model_variant(llama, tmp_path, **changes))


def test_mla_model_is_named(llama, tmp_path):
    model = model_variant(llama, tmp_path, architectures=["DeepseekV2ForCausalLM"],
                     model_type="deepseek_v2", kv_lora_rank=64, q_lora_rank=None,
                     qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                     n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=128,
                     first_k_dense_replace=4, moe_layer_freq=1)
    with pytest.raises(ValueError, match="MLA"):
        engine_config(model)


def test_channel_groups_must_divide_the_head_size(llama, tmp_path):
    model = model_variant(llama, tmp_path, head_dim=96)
    with pytest.raises(ValueError, match="value_group_size=64 does not divide the model's "
                                         "head size 96"):
        engine_config(model, {"value_group_size": 64})
    with pytest.raises(ValueError, match="group_size=64 does not divide"):
        engine_config(model, {"group_size": 64, "key_axis": "token"})
    assert engine_config(model, {"value_group_size": 32}) is not None


def test_the_check_after_kv_sizing_keeps_a_users_block_size(llama):
    """vLLM runs the platform's config check again once the KV cache is sized,
    with block_size then the smallest group's (the window's pages, 32 tokens
    here): a user's --block-size 128 must not be refused then (the engine died
    after loading the model), nor the block size be re-derived from it."""
    from vllm.platforms import current_platform

    config = engine_config(llama, {"k_bits": 4, "v_bits": 4}, block_size=128)
    assert config.cache_config.block_size == 128
    config.cache_config.num_gpu_blocks = 1000
    config.cache_config.block_size = 32
    current_platform.check_and_update_config(config)
    assert config.cache_config.block_size == 32


# Pairs of settings that do not compose. Each is refused at start-up with a
# message naming both; every other pair of the features is served (pairs of
# the window's storage with eviction, Quest and head maps: test_combinations.py).
PAIR_REFUSALS = [
    ({"eviction": {"method": "streamingllm"}, "head_map": "MAP"},
     ("eviction", "streamingllm", "head_map")),
    ({"eviction": {"method": "h2o", "budget_tokens": 512}, "quest": {}},
     ("quest", "eviction", "h2o")),
    ({"eviction": {"method": "streamingllm"}, "quest": {}},
     ("quest", "eviction", "streamingllm")),
    ({"quest": {}, "key_axis": "token"}, ("quest", "key_axis='token'")),
    ({"quest": {}, "k_bits": 16}, ("quest", "k_bits=16")),
    ({"fresh_prefill": "flash_attn", "prompt_attention": "as_stored"},
     ("fresh_prefill='flash_attn'", "prompt_attention", "as_stored")),
]


@pytest.mark.parametrize("kvcomp, names", PAIR_REFUSALS)
def test_pairs_that_do_not_compose_are_named_at_startup(llama, tmp_path, kvcomp, names):
    import json

    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layers": [["retrieval", "streaming"]] * 4}))
    kvcomp = {k: str(path) if v == "MAP" else v for k, v in kvcomp.items()}
    with pytest.raises(ValueError) as e:
        engine_config(llama, kvcomp)
    for name in names:
        assert name in str(e.value), (name, str(e.value))
    for key in kvcomp:  # each alone starts
        alone = {key: kvcomp[key]}
        if key == "quest" or alone.get("prompt_attention") == "as_stored":
            alone = {**alone, "block_size": 128}
        engine_config(llama, alone)


def test_a_bad_switch_does_not_stop_other_engines(monkeypatch):
    """vLLM loads the plugin (and its runner hooks) for every engine, KVCOMP or
    not: a runner of another backend asks the hook's question without reading
    the switch, so a bad value raises nowhere but at a KVCOMP start-up, which
    names it (above)."""
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from vllm_kvcomp.patches import prompt_steps

    monkeypatch.setattr(type(current_platform), "is_cpu", lambda *a: False)
    monkeypatch.setenv("KVCOMP_EVICTION_GRAPHS", "yes")
    other = SimpleNamespace(attention_config=SimpleNamespace(backend=None),
                            additional_config={})
    assert prompt_steps.eager_prompt_steps(other) is False
    kvcomp = SimpleNamespace(
        attention_config=SimpleNamespace(backend=SimpleNamespace(name="KVCOMP")),
        additional_config={"kvcomp": {"eviction": {"method": "h2o", "budget_tokens": 64}}})
    with pytest.raises(ValueError, match="KVCOMP_EVICTION_GRAPHS"):
        prompt_steps.eager_prompt_steps(kvcomp)
