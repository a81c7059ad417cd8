"""A pool that start-up accepted serves every request that fits ``max_model_len``.

vLLM checks at start-up that one request of ``max_model_len`` tokens fits the
pool, counting the packed pages of Q(max_model_len) tokens and the residual
window's admission cap. A request's real charge must stay within that: a
first chunk charged for every one of its tokens in the residual group once
left prompts of >= 1000 tokens waiting forever on 36 blocks ("Running: 0
reqs, Waiting: 36 reqs"). Every request here must return its full output.
"""
from e2e_util import run_engine, token_prompts
from vllm_kvcomp.tiny_model import make_tiny_llama

MAX_TOKENS = 16


def test_long_prompts_are_served_on_the_smallest_accepted_pool(tmp_path):
    model = make_tiny_llama(str(tmp_path / "tiny"))
    lengths = [2048 - MAX_TOKENS, 1200, 10, 1464, 700, 64]
    spec = dict(model=model, backend="kvcomp", kvcomp={"k_bits": 4, "v_bits": 4},
                engine=dict(max_model_len=2048, num_gpu_blocks_override=36, max_num_seqs=8,
                            dtype="bfloat16"),
                prompts=token_prompts(lengths, seed=3), max_tokens=MAX_TOKENS)
    res = run_engine(spec, timeout=900)
    assert [len(t) for t in res["tokens"]] == [MAX_TOKENS] * len(lengths)
