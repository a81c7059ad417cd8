"""A greedy request gives the same tokens whether or not its prefix came from
the prefix cache (CPU engine, tiny model, chunked prefill).

The prompts run twice in one engine: the second round hits the blocks the
first one cached. With prompts attending as stored (the CPU default) each
token's attention does not depend on where a chunk or a hit began, so the
rounds agree exactly, logprobs included. With ``full_precision`` a chunk
attends its own tokens unquantized, so a hit (older tokens read back
quantized) moves the logprobs: checked too, so that the test can fail.
"""
import pytest

from e2e_util import run_engine, token_prompts
from vllm_kvcomp.tiny_model import make_tiny_llama

PROMPTS = token_prompts([900, 700], seed=7, shared_prefix=0)
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _rounds(model, kv, batches=None):
    """(round 1's tokens, round 2's, and their logprobs); ``batches``: the
    prompts' generate calls (engine_runner.py), else both prompts in one call
    per round."""
    res = run_engine(dict(model=model, backend="kvcomp", kvcomp=kv, prompts=PROMPTS,
                          max_tokens=MAX_TOKENS, logprobs=True, rounds=2, batches=batches,
                          engine=dict(max_model_len=1024, max_num_batched_tokens=256,
                                      enable_chunked_prefill=True,
                                      enable_prefix_caching=True)))
    n = len(PROMPTS)
    assert res["prefix_cache_hits"] > 0, res["prefix_cache_hits"]
    return res["tokens"][:n], res["tokens"][n:], res["logprobs"][:n], res["logprobs"][n:]


def _worst(lp1, lp2):
    """Largest change of a chosen token's logprob between the rounds."""
    return max(abs(a - b) for x, y in zip(lp1, lp2) for a, b in zip(x, y))


# k4v4's default (a ring whose window empties at each 64-token group) and k2v2
# with its window by position; k2v2's default ring always holds a window, so it
# gets no hits (test_k2v2_default_ring_gets_no_hits)
@pytest.mark.parametrize("kv", [{"k_bits": 4, "v_bits": 4},
                                {"k_bits": 2, "v_bits": 2, "residual_ring": False}])
def test_same_tokens_with_and_without_a_prefix_hit(model, kv):
    first, second, lp1, lp2 = _rounds(model, kv)
    assert first == second
    assert _worst(lp1, lp2) < 1e-4


def test_same_tokens_with_a_head_map_and_a_prefix_hit(model, tmp_path):
    """Half of every layer's KV heads streaming (16 sinks + 64 recent tokens):
    a hit takes the retrieval heads' pages and the streaming heads' sinks and
    window where the first round's chunks ended, and gives the first round's
    tokens and logprobs."""
    import json

    head_map = tmp_path / "map.json"
    head_map.write_text(json.dumps(
        {"layers": [["retrieval", "streaming"], ["streaming", "retrieval"]] * 2}))
    first, second, lp1, lp2 = _rounds(model, {"k_bits": 4, "v_bits": 4,
                                              "head_map": str(head_map),
                                              "sink_tokens": 16, "recent_tokens": 64})
    assert first == second
    assert _worst(lp1, lp2) < 1e-4


def test_k2v2_default_ring_gets_no_hits(model):
    """k2v2's default window (a ring of 160..287 e4m3 tokens) is never empty:
    the second round finds no hit and gives the first round's tokens."""
    res = run_engine(dict(model=model, backend="kvcomp", kvcomp={"k_bits": 2, "v_bits": 2},
                          prompts=PROMPTS, max_tokens=MAX_TOKENS, rounds=2,
                          engine=dict(max_model_len=1024, max_num_batched_tokens=256,
                                      enable_chunked_prefill=True,
                                      enable_prefix_caching=True)))
    n = len(PROMPTS)
    assert res["prefix_cache_hits"] == 0
    assert res["tokens"][:n] == res["tokens"][n:]


def test_full_precision_prompts_are_not_cache_consistent(model):
    _, _, lp1, lp2 = _rounds(model, {"k_bits": 2, "v_bits": 2, "residual_ring": False,
                                     "prompt_attention": "full_precision"})
    print("worst logprob change, full_precision prompts:", _worst(lp1, lp2))
    assert _worst(lp1, lp2) > 1e-2


def test_fp8_window_is_cache_consistent(model):
    """A hit reads what a cold run stored: each prompt in a generate call of
    its own, the second round's logprobs are the first's exactly. (Each hit
    here, 768 and 512 tokens, ends where one of the cold run's 256-token
    chunks ends, so the tokens after it are computed in the same shapes.)

    Each prompt runs alone because rounding to e4m3 on arrival turns the last
    bits of fp32 noise into whole e4m3 steps: with both prompts in one call,
    the hit round batches the recomputed tokens differently, this CPU's
    matmuls round their rows differently by the batch's shape, and an element
    that lands on the other side of an e4m3 rounding boundary moves the
    logprobs by 1.3e-4 (the model-dtype window: 7e-6)."""
    first, second, lp1, lp2 = _rounds(model, {"k_bits": 2, "v_bits": 2,
                                              "residual_dtype": "fp8_e4m3"},
                                      batches=[[0], [1], [0], [1]])
    assert first == second
    assert _worst(lp1, lp2) < 1e-6
