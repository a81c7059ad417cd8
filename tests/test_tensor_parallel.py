"""Tensor parallelism on the CPU path: each rank packs and serves its own KV heads.

vLLM's CPU platform runs the ranks as processes (shared memory / gloo); every
engine here is a fresh process group on the tiny float32 Llama (2 KV heads, one
a rank at tensor_parallel_size 2). Quantization is per head, so sharding the
heads changes what a head stores or attends only by float rounding.
"""
import json

import pytest

import vllm_kvcomp
from e2e_util import engine_config, model_variant, run_engines, token_prompts
from vllm_kvcomp.config import KvcompConfig, KvcompConfigError
from vllm_kvcomp.policies.head_map import HeadMap, HeadMapError, rank_split, served_split
from vllm_kvcomp.tiny_model import make_tiny_llama

# prompts past one 128-token group, so k4v4 serves packed pages on every rank
PROMPTS = token_prompts([300, 40, 200], seed=5)
ENGINE = dict(max_model_len=1024, max_num_seqs=4)
# the ranks share the cores, unbound: vLLM's automatic binding splits a
# machine's cores between ranks after reserving one, and CI has two
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "nobind"}
S, R = "streaming", "retrieval"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    vllm_kvcomp.register()
    return make_tiny_llama(str(tmp_path_factory.mktemp("tiny")))


def _one_and_two_ranks(model, kvcomp):
    """The prompts served at tensor_parallel_size 1 and 2."""
    def run(tp):
        engine = {**ENGINE, "tensor_parallel_size": tp}
        if tp > 1:
            engine["distributed_executor_backend"] = "mp"
        return dict(spec=dict(model=model, backend="kvcomp", kvcomp=kvcomp, engine=engine,
                              prompts=PROMPTS, max_tokens=16, logprobs=True), env=TP_ENV)

    return run_engines(run(1), run(2))


# The row-parallel projections sum the ranks' partial products in another
# order, so keys and values differ from one rank's in float rounding; stored
# in the model dtype that stays rounding, but a value on a 4-bit rounding
# boundary lands one level away (measured: up to 0.010 in a logprob at k4v4,
# 0.028 with the head map).
QUANTIZED_TOL = 0.1


def _same_output_half_the_heads(one, two, logprob_tol):
    assert two["tokens"] == one["tokens"]
    for a, b in zip(one["logprobs"], two["logprobs"]):
        assert b == pytest.approx(a, abs=logprob_tol)
    # half the KV heads a rank: a rank's pages are half as large, so the same
    # memory a rank holds twice the tokens (the same tokens for half the memory)
    assert one["kv_cache_tokens"] and two["kv_cache_tokens"]
    assert two["kv_cache_tokens"] == pytest.approx(2 * one["kv_cache_tokens"], rel=0.01)


@pytest.mark.parametrize("kvcomp, logprob_tol", [
    ({"k_bits": 16, "v_bits": 16}, 1e-3), ({"k_bits": 4, "v_bits": 4}, QUANTIZED_TOL)],
    ids=["k16v16", "k4v4"])
def test_two_ranks_generate_what_one_does(model, kvcomp, logprob_tol):
    _same_output_half_the_heads(*_one_and_two_ranks(model, kvcomp), logprob_tol)


def test_two_ranks_serve_their_rows_of_a_head_map(tmp_path):
    # 4 KV heads, one streaming head a rank in every layer, at other places
    # in every layer: a rank reading another rank's rows would stream the
    # wrong heads and change the tokens
    four = make_tiny_llama(str(tmp_path / "tiny4"), num_kv_heads=4)
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"layers": [[S, R, R, S], [R, S, S, R], [S, R, S, R],
                                           [R, S, R, S]]}))
    kvcomp = {"k_bits": 4, "v_bits": 4, "head_map": str(path), "sink_tokens": 16,
              "recent_tokens": 64}
    _same_output_half_the_heads(*_one_and_two_ranks(four, kvcomp), QUANTIZED_TOL)


def test_startup_accepts_two_ranks_on_cpu(model):
    assert engine_config(model, tensor_parallel_size=2).parallel_config.tensor_parallel_size == 2


def test_fewer_kv_heads_than_ranks_is_named(model, tmp_path):
    one_head = model_variant(model, tmp_path, num_key_value_heads=1)
    with pytest.raises(ValueError, match=r"1 KV heads and tensor_parallel_size=2 \(vLLM would "
                                         "replicate KV heads"):
        engine_config(one_head, tensor_parallel_size=2)


def test_gpu_path_refuses_tensor_parallelism():
    from vllm_kvcomp.validation import check_tensor_parallel

    cfg = KvcompConfig()
    check_tensor_parallel(cfg, 2, None, on_cpu=True)
    check_tensor_parallel(cfg, 1, None, on_cpu=False)
    with pytest.raises(KvcompConfigError, match="tensor_parallel_size=2.* has not run with "
                                                "more than one rank"):
        check_tensor_parallel(cfg, 2, None, on_cpu=False)



def test_each_rank_takes_its_heads_rows_renumbered():
    split = served_split(HeadMap(roles=((S, R, R, S), (R, S, S, R))), 0.5)
    r0, r1 = rank_split(split, 0, 2), rank_split(split, 1, 2)
    # rank 0 holds KV heads 0-1, rank 1 heads 2-3, both numbered from 0
    assert (r0.streaming, r0.retrieval) == (((0,), (1,)), ((1,), (0,)))
    assert (r1.streaming, r1.retrieval) == (((1,), (0,)), ((0,), (1,)))
    assert rank_split(split, 0, 1) == split


@pytest.mark.parametrize("roles, tp, message", [
    # every layer streams 2 of 4, but all on rank 0 in the first layer
    (((S, S, R, R), (S, R, S, R)), 2, r"rank 0 \(KV heads 0..1\) would stream \[2, 1\]"),
    # 1 streaming head a layer cannot be shared by 2 ranks
    (((S, R), (R, S)), 2, "1 streaming heads per layer cannot be split evenly"),
    (((S, R, R), (R, S, R)), 2, "3 KV heads cannot be split evenly"),
])
def test_maps_ranks_cannot_serve_are_named(roles, tp, message):
    split = served_split(HeadMap(roles=roles), 0.5)
    with pytest.raises(HeadMapError, match=message):
        for rank in range(tp):
            rank_split(split, rank, tp)


def test_startup_names_a_map_the_ranks_cannot_serve(model, tmp_path):
    four = model_variant(model, tmp_path, num_key_value_heads=4)
    good, bad = tmp_path / "good.json", tmp_path / "bad.json"
    good.write_text(json.dumps({"layers": [[S, R, S, R]] * 4}))
    bad.write_text(json.dumps({"layers": [[S, S, R, R]] * 4}))
    engine_config(four, {"head_map": str(good)}, tensor_parallel_size=2)
    with pytest.raises(ValueError, match=r"rank 0 \(KV heads 0..1\) would stream \[2, 2, 2, 2\]"):
        engine_config(four, {"head_map": str(bad)}, tensor_parallel_size=2)
