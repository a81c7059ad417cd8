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


def _rounds(model, kv):
    res = run_engine(dict(model=model, backend="kvcomp", kvcomp=kv, prompts=PROMPTS,
                          max_tokens=MAX_TOKENS, logprobs=True, rounds=2,
                          engine=dict(max_model_len=1024, max_num_batched_tokens=256,
                                      enable_chunked_prefill=True,
                                      enable_prefix_caching=True)))
    n = len(PROMPTS)
    assert res["prefix_cache_hits"] > 0, res["prefix_cache_hits"]
    return res["tokens"][:n], res["tokens"][n:], res["logprobs"][:n], res["logprobs"][n:]


def _worst(lp1, lp2):
    """Largest change of a chosen token's logprob between the rounds."""
    return max(abs(a - b) for x, y in zip(lp1, lp2) for a, b in zip(x, y))


@pytest.mark.parametrize("bits", [(4, 4), (2, 2)])
def test_same_tokens_with_and_without_a_prefix_hit(model, bits):
    first, second, lp1, lp2 = _rounds(model, {"k_bits": bits[0], "v_bits": bits[1]})
    assert first == second
    assert _worst(lp1, lp2) < 1e-4


def test_full_precision_prompts_are_not_cache_consistent(model):
    _, _, lp1, lp2 = _rounds(model, {"k_bits": 2, "v_bits": 2,
                                     "prompt_attention": "full_precision"})
    print("worst logprob change, full_precision prompts:", _worst(lp1, lp2))
    assert _worst(lp1, lp2) > 1e-2


def test_fp8_window_is_cache_consistent(model):
    """A hit reads the e4m3 window blocks an earlier request cached, which
    hold what a cold run's window holds (K and V rounded on arrival)."""
    first, second, lp1, lp2 = _rounds(model, {"k_bits": 2, "v_bits": 2,
                                              "residual_dtype": "fp8_e4m3"})
    assert first == second
    assert _worst(lp1, lp2) < 1e-4
