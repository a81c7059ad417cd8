"""Head maps (files, thresholding, start-up checks) and the two calibrations
that produce them (RazorAttention scoring, DuoAttention gate fitting)."""
import json
import os
import pickle
import sys

import pytest
import torch

import vllm_kvcomp
from e2e_util import engine_config
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.policies.attention import window_mask
from vllm_kvcomp.policies.head_map import (
    HeadMap,
    HeadMapError,
    load_head_map,
    threshold_gates,
)
from vllm_kvcomp.tiny_model import make_tiny_llama

# 2 layers x 3 KV heads; ascending: 0.1 (0,1), 0.2 (1,2), 0.3 (1,0), 0.5 (0,2),
# 0.7 (1,1), 0.9 (0,0)
GATES = [[0.9, 0.1, 0.5], [0.3, 0.7, 0.2]]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    vllm_kvcomp.register()
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def model(llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama, dtype=torch.float32).eval()


def _write(tmp_path, name, content):
    p = tmp_path / name
    (p.write_bytes if isinstance(content, bytes) else p.write_text)(content)
    return str(p)


# ------------------------------------------------------------------ loading
def test_duo_tsv_loads_as_gates(tmp_path):
    # as numpy.savetxt(..., delimiter="\t") writes it, with a comment line
    rows = ["# gates", "\t".join(f"{g:.18e}" for g in GATES[0]),
            "\t".join(f"{g:.18e}" for g in GATES[1]), ""]
    hm = load_head_map(_write(tmp_path, "full_attention_heads.tsv", "\n".join(rows)))
    assert hm.roles is None and hm.gates == ((0.9, 0.1, 0.5), (0.3, 0.7, 0.2))
    assert hm.shape == (2, 3)


def test_json_roles_and_gates_load(tmp_path):
    roles = [["retrieval", "streaming"], ["streaming", "streaming"]]
    hm = load_head_map(_write(tmp_path, "r.json", json.dumps(
        {"layers": roles, "model": "m", "num_layers": 2, "num_kv_heads": 2,
         "sink_tokens": 4, "recent_tokens": 8})))
    assert hm.roles == (("retrieval", "streaming"), ("streaming", "streaming"))
    assert hm.metadata == {"model": "m", "num_layers": 2, "num_kv_heads": 2,
                           "sink_tokens": 4, "recent_tokens": 8}
    hm = load_head_map(_write(tmp_path, "g.json", json.dumps(
        {"gates": [[1, 0.25]], "method": "duo"})))
    assert hm.gates == ((1.0, 0.25),) and hm.metadata == {"method": "duo"}


@pytest.mark.parametrize("ratio, streaming", [
    (0.0, []),
    (1 / 6, [(0, 1)]),
    (0.25, [(0, 1), (1, 2)]),          # 1.5 entries, rounded half up
    (0.5, [(0, 1), (1, 2), (1, 0)]),
    (0.8, [(0, 1), (1, 2), (1, 0), (0, 2), (1, 1)]),  # 4.8 -> 5
    (1.0, [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]),
])
def test_threshold_streams_the_lowest_gates(ratio, streaming):
    got = threshold_gates(GATES, ratio)
    assert {(l, h) for l in range(2) for h in range(3) if got[l][h]} == set(streaming)


def test_threshold_ties_go_in_layer_then_head_order():
    assert threshold_gates([[0.5, 0.5], [0.5, 0.5]], 0.5) == [[True, True], [False, False]]
    assert threshold_gates([[0.5, 0.4], [0.4, 0.5]], 0.25) == [[False, True], [False, False]]


def test_roles_map_ignores_the_ratio():
    hm = HeadMap(roles=(("retrieval", "streaming"),))
    for ratio in (0.0, 0.5, 1.0):
        assert hm.streaming(ratio) == [[False, True]]


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, content, message", [
    ("bad_role.json", {"layers": [["retrieval", "stream"]]},
     r"layer 0 KV head 1 has role 'stream'"),
    ("word.json", {"gates": [[0.5, "high"]]}, r"layer 0 KV head 1: gate 'high' is not a number"),
    ("bool.json", {"gates": [[0.5, True]]}, r"gate True is not a number"),
    ("range.json", {"gates": [[0.5, 1.5]]}, r"gate 1.5 is outside \[0, 1\]"),
    ("ragged.json", {"gates": [[0.5, 0.1], [0.2]]}, r"row lengths are \[2, 1\]"),
    ("both.json", {"gates": [[0.5]], "layers": [["streaming"]]}, "exactly one of"),
    ("unknown.json", {"gates": [[0.5]], "heads": 1}, r"unknown key\(s\) \['heads'\]"),
    ("meta.json", {"gates": [[0.5, 0.5]], "num_kv_heads": 4},
     "num_kv_heads=4 but the table has 2"),
])
def test_bad_json_maps_are_named(tmp_path, name, content, message):
    path = _write(tmp_path, name, json.dumps(content))
    with pytest.raises(HeadMapError, match=message) as e:
        load_head_map(path)
    assert path in str(e.value)


def test_non_numeric_tsv_gate_is_named(tmp_path):
    path = _write(tmp_path, "g.tsv", "0.5\t0.1\n0.2\tx\n")
    with pytest.raises(HeadMapError, match=r"line 2 column 2: gate 'x' is not a number"):
        load_head_map(path)


@pytest.mark.parametrize("name", ["heads.pkl", "heads.json", "heads.tsv"])
def test_pickle_is_refused_whatever_its_name(tmp_path, name, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a head map was unpickled")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    path = _write(tmp_path, name, pickle.dumps({"gates": [[0.5]]}))
    with pytest.raises(HeadMapError, match="looks like a pickle.*never unpickled"):
        load_head_map(path)


def test_wrong_model_shape_names_both_shapes_and_file(tmp_path):
    path = _write(tmp_path, "g.json", json.dumps({"gates": GATES}))
    hm = load_head_map(path)
    hm.check_model_shape(2, 3)
    with pytest.raises(HeadMapError, match=rf"{path} has 2 layers x 3 KV heads but the model "
                                           r"has 4 layers x 3 KV heads"):
        hm.check_model_shape(4, 3)
    with pytest.raises(HeadMapError, match=r"2 layers x 3 KV heads but the model has 2 layers "
                                           r"x 8 KV heads"):
        hm.check_model_shape(2, 8)


@pytest.mark.parametrize("ratio", [-0.1, 1.5, float("nan")])
def test_ratio_out_of_range(ratio):
    with pytest.raises(HeadMapError, match="streaming_ratio"):
        threshold_gates(GATES, ratio)
    with pytest.raises(KvcompConfigError, match=r"kvcomp streaming_ratio=.* must be in \[0, 1\]"):
        KvcompConfig.from_dict({"streaming_ratio": ratio})


@pytest.mark.parametrize("kvcomp, message", [
    ({"sink_tokens": 0}, "kvcomp sink_tokens=0 must be a positive integer"),
    ({"recent_tokens": -4}, "kvcomp recent_tokens=-4 must be a positive integer"),
    ({"recent_tokens": 256.0}, "kvcomp recent_tokens=256.0 must be int"),
    ({"streaming_ratio": "0.5"}, "kvcomp streaming_ratio='0.5' must be float"),
    ({"head_map": "/nonexistent/map.json"},
     "kvcomp head_map='/nonexistent/map.json' cannot be read: No such file"),
    ({"head_map": 3}, "kvcomp head_map=3 must be str or null"),
])
def test_bad_head_split_settings(kvcomp, message):
    with pytest.raises(KvcompConfigError, match=message):
        KvcompConfig.from_dict(kvcomp)


def test_head_split_defaults():
    cfg = KvcompConfig.from_dict({"streaming_ratio": 1})
    assert (cfg.head_map, cfg.sink_tokens, cfg.recent_tokens) == (None, 64, 256)
    assert KvcompConfig().streaming_ratio == 0.5


# ------------------------------------------------------------------ start-up
@pytest.mark.parametrize("content", [
    {"gates": [[0.9, 0.1]] * 4},
    {"layers": [["retrieval", "streaming"]] * 4},
])
def test_valid_head_map_is_served_on_either_platform(llama, tmp_path, content, monkeypatch):
    from vllm.platforms import current_platform

    path = _write(tmp_path, "map.json", json.dumps(content))  # tiny Llama: 4 x 2
    assert engine_config(llama, {"head_map": path}).additional_config["kvcomp"]["head_map"] == path
    monkeypatch.setattr(type(current_platform), "is_cpu", lambda self=None: False,
                        raising=False)
    assert engine_config(llama, {"head_map": path}).additional_config["kvcomp"]["head_map"] == path
    uneven = _write(tmp_path, "uneven.json", json.dumps(
        {"layers": [["retrieval", "streaming"]] * 3 + [["retrieval", "retrieval"]]}))
    with pytest.raises(ValueError, match="different numbers of streaming heads per layer"):
        engine_config(llama, {"head_map": uneven})


def test_head_map_of_another_model_is_named_at_startup(llama, tmp_path):
    path = _write(tmp_path, "map.tsv", "0.5\t0.5\t0.5\n" * 32)
    with pytest.raises(ValueError, match=rf"kvcomp head_map: head map {path} has 32 layers x 3 "
                                         r"KV heads but the model has 4 layers x 2 KV heads"):
        engine_config(llama, {"head_map": path})


def test_missing_head_map_is_named_at_startup(llama, tmp_path):
    with pytest.raises(ValueError, match=r"kvcomp head_map=.*cannot be read"):
        engine_config(llama, {"head_map": str(tmp_path / "none.json")})


# ------------------------------------------------------------------ razor
def test_razor_scores_match_eager_attention_probabilities(model):
    """The scoring attention function against probabilities from transformers'
    own eager attention (output_attentions), scored with diagonals."""
    from vllm_kvcomp.policies.razor import RazorAttention

    razor = RazorAttention(seq_len=96, repeats=3, samples=1, seed=5)
    echo, induction = razor.score(model)
    cfg = model.config
    ids = razor.sample_ids(cfg, torch.Generator().manual_seed(5))
    assert cfg.bos_token_id is not None and ids[0, 0] == cfg.bos_token_id
    assert torch.equal(ids[0, 1:33], ids[0, 33:65]) and torch.equal(ids[0, 1:33], ids[0, 65:])
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.set_attn_implementation("sdpa")
    period, start, groups = 32, 33, cfg.num_attention_heads // cfg.num_key_value_heads
    for layer, probs in enumerate(out.attentions):
        p = probs[0].double()
        # diagonal offset -period holds probs[i, i - period] for i = period, ...
        e = torch.diagonal(p, offset=-period, dim1=-2, dim2=-1)[:, start - period:].mean(-1)
        n = torch.diagonal(p, offset=-(period - 1), dim1=-2, dim2=-1)[:, start - period + 1:]
        n = n.mean(-1)
        for kv in range(cfg.num_key_value_heads):
            heads = slice(kv * groups, (kv + 1) * groups)
            # float32 probabilities either way: 1e-6 is well above rounding
            assert echo[layer, kv].item() == pytest.approx(e[heads].max().item(), abs=1e-6)
            assert induction[layer, kv].item() == pytest.approx(n[heads].max().item(), abs=1e-6)
    assert echo.shape == (cfg.num_hidden_layers, cfg.num_key_value_heads)


def test_razor_scores_do_not_depend_on_the_row_chunks(model, monkeypatch):
    """Probabilities taken ten query rows at a time (as a long sequence on a
    large model is) score as the whole matrix does."""
    from vllm_kvcomp.policies import razor as razor_module

    razor = razor_module.RazorAttention(seq_len=96, repeats=3, samples=2, seed=5)
    whole = razor.score(model)
    heads, t = model.config.num_attention_heads, 97
    monkeypatch.setattr(razor_module, "PROB_ELEMENTS", heads * t * 10)
    chunked = razor.score(model)
    for a, b in zip(whole, chunked):
        # float32 either way; only the order of the output's sums may differ
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def _uniform_causal(heads, t):
    return torch.tril(torch.ones(t, t)) / torch.arange(1, t + 1)[:, None].expand(heads, t, t)


def test_planted_induction_and_echo_heads_are_retrieval():
    from vllm_kvcomp.policies.razor import RazorAttention, echo_induction_scores, per_kv_head

    period, t = 8, 33  # BOS then 4 repeats of 8
    start = 1 + period
    layers = []
    for plant in (None, "induction", "echo"):
        probs = _uniform_causal(4, t)
        for i in range(start, t):
            target = i - period + 1 if plant == "induction" else i - period
            if plant:  # query head 3 (KV head 1) of this layer
                probs[3, i] = 0.1 * probs[3, i]
                probs[3, i, target] += 0.9
        assert torch.allclose(probs.sum(-1), torch.ones(4, t))
        layers.append(echo_induction_scores(probs[None], period, start))
    echo = per_kv_head(torch.stack([e for e, _ in layers]), 2)
    induction = per_kv_head(torch.stack([n for _, n in layers]), 2)
    assert induction.argmax().item() == 1 * 2 + 1 and echo.argmax().item() == 2 * 2 + 1
    gates = RazorAttention(echo_fraction=0.1, induction_fraction=0.1).gates(echo, induction)
    streaming = threshold_gates(gates.tolist(), 4 / 6)
    assert not streaming[1][1] and not streaming[2][1]
    assert sum(map(sum, streaming)) == 4


# ------------------------------------------------------------------ duo
def _reference(q, k, v, keep):
    """float64 softmax attention with the mask written out position by position."""
    heads, t = q.shape[1], q.shape[2]
    out = torch.zeros_like(q)
    for h in range(heads):
        kv = h // (heads // k.shape[1])
        for i in range(t):
            js = [j for j in range(t) if keep(i, j)]
            s = torch.stack([q[0, h, i] @ k[0, kv, j] for j in js]) / q.shape[-1] ** 0.5
            w = torch.softmax(s, 0)
            out[0, h, i] = sum(w[n] * v[0, kv, j] for n, j in enumerate(js))
    return out


def test_window_mask_by_hand():
    expected = torch.tensor([[1, 0, 0, 0, 0, 0],
                             [1, 1, 0, 0, 0, 0],
                             [1, 1, 1, 0, 0, 0],
                             [1, 0, 1, 1, 0, 0],
                             [1, 0, 0, 1, 1, 0],
                             [1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(window_mask(6, 6, sink=1, recent=2), expected)
    assert torch.equal(window_mask(2, 6, sink=1, recent=2), expected[4:])
    assert torch.equal(window_mask(6, 6), torch.ones(6, 6, dtype=torch.bool).tril())


def test_duo_mixer_is_full_at_one_and_streaming_at_zero():
    from vllm_kvcomp.policies.duo import mix_attention

    torch.manual_seed(0)
    t, sink, recent = 12, 2, 4
    q = torch.randn(1, 4, t, 8, dtype=torch.float64)
    k, v = (torch.randn(1, 2, t, 8, dtype=torch.float64) for _ in range(2))
    full = _reference(q, k, v, lambda i, j: j <= i)
    stream = _reference(q, k, v, lambda i, j: j <= i and (j < sink or i - j < recent))
    assert not torch.allclose(full, stream)
    mix = lambda g: mix_attention(q, k, v, torch.tensor(g, dtype=torch.float64),  # noqa: E731
                                  8 ** -0.5, sink, recent)
    # float64 throughout: 1e-10 only allows for summation order
    torch.testing.assert_close(mix([1.0, 1.0]), full, atol=1e-10, rtol=0)
    torch.testing.assert_close(mix([0.0, 0.0]), stream, atol=1e-10, rtol=0)
    expected = torch.cat([full[:, :2], 0.3 * full[:, 2:] + 0.7 * stream[:, 2:]], dim=1)
    torch.testing.assert_close(mix([1.0, 0.3]), expected, atol=1e-10, rtol=0)


def test_duo_gates_reach_the_model(model, llama):
    """Through transformers' attention interface: gates of 1 give the model's
    own (SDPA) hidden states, gates of 0 change them once the sequence is
    longer than the window, and the loss has a gradient on the gates."""
    from vllm_kvcomp.policies.attention import attention_implementation
    from vllm_kvcomp.policies.duo import hidden_states, register_attention

    ids = torch.randint(2, model.config.vocab_size, (1, 64), generator=torch.Generator()
                        .manual_seed(0))
    with torch.no_grad():
        own = model.base_model(input_ids=ids, use_cache=False).last_hidden_state
    gates = torch.full((4, 2), 0.5, requires_grad=True)
    with attention_implementation(model, register_attention()):
        assert model.config._attn_implementation == "kvcomp_duo"
        with torch.no_grad():
            ones = hidden_states(model, ids, torch.ones(4, 2), 4, 8)
            zeros = hidden_states(model, ids, torch.zeros(4, 2), 4, 8)
        mixed = hidden_states(model, ids, gates, 4, 8)
    # float32, same SDPA call: 1e-5 allows for the float32 mixing only
    torch.testing.assert_close(ones, own, atol=1e-5, rtol=0)
    assert (zeros - own).abs().max() > 1e-2
    torch.nn.functional.mse_loss(mixed, own).backward()
    assert (gates.grad.abs() > 0).all()


def test_duo_gates_all_stream_when_the_window_sees_everything(model, llama):
    """With sequences no longer than sink + recent, streaming attention is full
    attention: only the L1 penalty acts, and it takes every gate to 0."""
    from transformers import AutoTokenizer

    from vllm_kvcomp.policies.duo import DuoAttention

    duo = DuoAttention(sink_tokens=16, recent_tokens=80, seq_len=96, passkeys=1, steps=30,
                       lr=0.05)
    gates, losses = duo.calibrate(model, AutoTokenizer.from_pretrained(llama))
    assert gates.shape == (4, 2)
    assert gates.max().item() == 0.0, gates
    assert losses[-1] < losses[0]
    assert model.config._attn_implementation == "sdpa"
    assert not any(p.requires_grad is False for p in model.parameters())


def test_duo_checkpointed_layers_fit_the_same_gates(model, llama):
    """Recomputing the layers in the backward pass changes the memory, not the
    gradient: the same samples give the same gates, and the layers are left
    as they were."""
    from transformers import AutoTokenizer

    from vllm_kvcomp.policies.duo import DuoAttention

    tokenizer = AutoTokenizer.from_pretrained(llama)
    calls = []
    hook = model.base_model.layers[0].self_attn.register_forward_hook(
        lambda *_: calls.append(1))
    fits = []
    try:
        for c in (False, True):
            calls.clear()
            fits.append(DuoAttention(sink_tokens=8, recent_tokens=32, seq_len=160, passkeys=1,
                                     steps=4, lr=0.05, checkpoint_layers=c)
                        .calibrate(model, tokenizer))
            fits[-1] += (len(calls),)
    finally:
        hook.remove()
    (plain, plain_losses, plain_calls), (ckpt, ckpt_losses, ckpt_calls) = fits
    # a step: the target pass and the mixed one, and with checkpointing the
    # mixed one again in the backward pass
    assert (plain_calls, ckpt_calls) == (2 * 4, 3 * 4)
    assert plain.min() < 1.0  # the gates moved, so the comparison says something
    torch.testing.assert_close(ckpt, plain, atol=1e-6, rtol=0)
    assert ckpt_losses == pytest.approx(plain_losses, rel=1e-5)
    assert all("forward" not in layer.__dict__ for layer in model.base_model.layers)


# ------------------------------------------------------------------ CLI
def _check_written(out, method):
    hm = load_head_map(out)
    assert hm.gates is not None and hm.shape == (4, 2)
    assert hm.metadata["method"] == method and hm.metadata["num_layers"] == 4
    png = os.path.splitext(out)[0] + ".png"
    from PIL import Image

    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 50


def test_cli_razor_end_to_end(llama, tmp_path, monkeypatch, capsys):
    from vllm_kvcomp import cli

    out = str(tmp_path / "razor" / "map.json")
    monkeypatch.setattr(sys, "argv", ["vllm-kvcomp", "calibrate-heads", llama, "--method",
                                      "razor", "--out", out, "--seq-len", "128",
                                      "--samples", "2"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 0
    assert f"wrote {out}" in capsys.readouterr().out
    _check_written(out, "razor")


def test_cli_duo_end_to_end(llama, tmp_path):
    from vllm_kvcomp.calibrate_heads import main

    out = str(tmp_path / "duo.json")
    assert main([llama, "--method", "duo", "--out", out, "--seq-len", "160", "--steps", "3",
                 "--sink-tokens", "8", "--recent-tokens", "32", "--passkeys", "1"]) == 0
    _check_written(out, "duo")
    assert load_head_map(out).metadata["sink_tokens"] == 8


def test_cli_names_a_too_short_sequence(llama, tmp_path, capsys):
    from vllm_kvcomp.calibrate_heads import main

    assert main([llama, "--method", "duo", "--out", str(tmp_path / "m.json"),
                 "--seq-len", "20", "--steps", "1"]) == 2
    assert "seq_len=20 cannot hold 4 passkey(s)" in capsys.readouterr().err


@pytest.fixture
def config_only(llama, tmp_path):
    """A model directory with the tiny Llama's config.json and nothing else."""
    path = tmp_path / "config_only"
    path.mkdir()
    (path / "config.json").write_text(open(os.path.join(llama, "config.json")).read())
    return str(path)


def test_cli_random_weights_calibrate_a_config_only_directory(config_only, tmp_path, capsys):
    from vllm_kvcomp.calibrate_heads import main

    out, stats = str(tmp_path / "duo.json"), str(tmp_path / "stats" / "duo.json")
    with pytest.raises(OSError):  # no weights: only --random-weights can run here
        main([config_only, "--method", "razor", "--out", str(tmp_path / "r.json"),
              "--seq-len", "64", "--samples", "1"])
    assert main([config_only, "--random-weights", "--method", "duo", "--out", out,
                 "--stats", stats, "--seq-len", "256", "--steps", "2", "--sink-tokens", "8",
                 "--recent-tokens", "32", "--passkeys", "1"]) == 0
    assert "do not serve it" in capsys.readouterr().out
    _check_written(out, "duo")
    assert load_head_map(out).metadata["calibration"]["random_weights"] is True
    with open(stats) as f:
        s = json.load(f)
    gpu = torch.cuda.is_available()
    assert s["method"] == "duo" and s["random_weights"] is True
    assert s["device"] == ("cuda" if gpu else "cpu")
    assert s["seq_len"] == 256 and s["steps"] == 2 and s["json"] == out
    assert 0 < s["load_seconds"] <= s["seconds"]
    if gpu:
        assert s["peak_gpu_memory_bytes"] > 0
    else:
        assert s["peak_gpu_memory_bytes"] is None and s["peak_gpu_memory_gib"] is None


def test_cli_random_weights_follow_the_seed(config_only, tmp_path):
    from vllm_kvcomp.calibrate_heads import main

    def echo(seed, name):
        out = str(tmp_path / f"{name}.json")
        assert main([config_only, "--random-weights", "--method", "razor", "--out", out,
                     "--seq-len", "64", "--samples", "1", "--seed", str(seed)]) == 0
        return load_head_map(out).metadata["calibration"]["echo"]

    assert echo(1, "a") == echo(1, "b") != echo(2, "c")


def test_byte_tokens_avoid_the_special_ids(llama):
    from transformers import AutoConfig

    from vllm_kvcomp.calibrate_heads import ByteTokenizer

    cfg = AutoConfig.from_pretrained(llama)
    ids = ByteTokenizer(cfg).encode("pass key 123456 \u00e9")
    assert len(ids) == len("pass key 123456 \u00e9".encode())
    assert not {cfg.bos_token_id, cfg.eos_token_id} & set(ids)
    assert all(0 <= i < cfg.vocab_size for i in ids)
